import NIOCore
import NIOPosix
import QCOW2
import Synchronization

/// Namespace of the NBD protocol constants and helpers (see docs/ARCHITECTURE.md).
public enum NBD {}

/// An NBD server (fixed newstyle, structured replies, block status) exporting
/// `NBDDevice`s over TCP, a Unix socket, or an inherited listening socket.
///
/// Threading: the network side runs on a small `MultiThreadedEventLoopGroup`; every disk
/// operation runs on a dedicated `NIOThreadPool`, never on an event loop. Connections beyond
/// `maxConnections` wait in the listen backlog (the server stops accepting, as qemu-nbd).
///
/// ```swift
/// let server = NBDServer(configuration: .init(exports: [export]))
/// let address = try server.start(.tcp(host: "127.0.0.1", port: 10809))
/// try server.wait()        // until stop(), or the last client left when not persistent
/// try server.shutdown()    // drains the thread pool; then close the image
/// ```
public final class NBDServer: Sendable {
    public struct Configuration: Sendable {
        public var exports: [NBDExport]
        /// Clients served at once (0: unlimited). Multi-conn is advertised when this is not 1.
        public var maxConnections: Int = 1
        /// Keep running after the last client disconnects.
        public var persistent: Bool = false
        public var limits = NBDConnectionLimits()
        /// Threads of the disk I/O pool.
        public var ioThreads: Int = NBDServer.defaultIOThreads
        /// Event loop threads.
        public var eventLoopThreads: Int = 1
        /// Diagnostics (connection errors, failed commands); nil to stay quiet.
        public var log: (@Sendable (String) -> Void)?

        public init(exports: [NBDExport]) {
            self.exports = exports
        }
    }

    /// Where to listen.
    public enum Endpoint: Sendable {
        case tcp(host: String, port: Int)
        case unixSocket(path: String)
        /// An already bound and listening socket (systemd socket activation passes fd 3).
        case listeningSocket(CInt)
    }

    /// 2 × cores, between 8 and 16: enough queue depth for the disk without oversubscribing.
    public static var defaultIOThreads: Int { min(16, max(8, 2 * System.coreCount)) }

    private struct State {
        var serverChannel: (any Channel)?
        var children: [ObjectIdentifier: any Channel] = [:]
        var everConnected = false
        var stopping = false
    }

    public let configuration: Configuration
    private let group: MultiThreadedEventLoopGroup
    private let pool: NIOThreadPool
    private let state = Mutex(State())
    private let done: EventLoopPromise<Void>

    public init(configuration: Configuration) {
        self.configuration = configuration
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        pool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreads))
        pool.start()
        done = group.next().makePromise(of: Void.self)
    }

    /// The address a server listens on.
    public struct ListeningAddress: Sendable, CustomStringConvertible {
        /// The TCP port, when listening on TCP.
        public var port: Int?
        public var description: String
    }

    /// Binds and starts accepting. Returns the local address (nil when NIO cannot report
    /// it, e.g. for some inherited sockets).
    @discardableResult
    public func start(_ endpoint: Endpoint) throws -> ListeningAddress? {
        let config = configuration
        let pool = self.pool
        let multiConn = config.maxConnections != 1
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 128)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.maxMessagesPerRead, value: 1)
            .serverChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AcceptLimiter(server: self))
                }
            }
            .childChannelOption(.allowRemoteHalfClosure, value: false)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                guard !isStopping else {
                    return channel.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
                }
                return channel.eventLoop.makeCompletedFuture {
                    let decoder = NBDFrameDecoder(maxOptionLength: config.limits.maxOptionLength,
                                                  maxPayload: config.limits.maxPayload)
                    try channel.pipeline.syncOperations.addHandlers([
                        ByteToMessageHandler(decoder, maximumBufferSize: Int(config.limits.maxPayload) + (1 << 20)),
                        NBDConnectionHandler(exports: config.exports, pool: pool, multiConn: multiConn,
                                             limits: config.limits, log: config.log),
                    ])
                }
            }
        let channel: any Channel
        switch endpoint {
        case let .tcp(host, port):
            channel = try bootstrap.bind(host: host, port: port).wait()
        case let .unixSocket(path):
            channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
        case let .listeningSocket(fd):
            channel = try bootstrap.withBoundSocket(fd).wait()
        }
        let stopNow = state.withLock { s -> Bool in
            s.serverChannel = channel
            return s.stopping
        }
        // stop() ran while we were binding: it could not close this channel.
        if stopNow { channel.close(promise: nil) }
        return channel.localAddress.map { ListeningAddress(port: $0.port, description: "\($0)") }
    }

    private var isStopping: Bool { state.withLock { $0.stopping } }

    /// Blocks until the server has stopped: after `stop()`, or when the last client
    /// disconnected and the server is not persistent.
    public func wait() throws {
        try done.futureResult.wait()
    }

    /// Stops accepting and closes every connection (in-flight disk work still completes).
    public func stop() {
        let (first, server, children) = state.withLock { s -> (Bool, (any Channel)?, [any Channel]) in
            let first = !s.stopping
            s.stopping = true
            return (first, s.serverChannel, Array(s.children.values))
        }
        guard first else { return }
        var closes: [EventLoopFuture<Void>] = []
        if let server { closes.append(server.close()) }
        closes += children.map { $0.close() }
        let loop = group.next()
        let done = self.done
        EventLoopFuture.whenAllComplete(closes, on: loop).whenComplete { _ in done.succeed(()) }
    }

    /// Waits for the disk work still queued or running to finish (so the device can be
    /// closed safely), then releases the event loops.
    public func shutdown() throws {
        try pool.syncShutdownGracefully()
        try group.syncShutdownGracefully()
    }

    // MARK: Connection accounting (called by AcceptLimiter)

    /// Whether another connection may be accepted now.
    fileprivate var canAccept: Bool {
        state.withLock { s in
            !s.stopping && (configuration.maxConnections <= 0 || s.children.count < configuration.maxConnections)
        }
    }

    fileprivate func accepted(_ child: any Channel) {
        let id = ObjectIdentifier(child)
        state.withLock { s in
            s.children[id] = child
            s.everConnected = true
        }
        child.closeFuture.whenComplete { [self] _ in
            let (serverChannel, last) = state.withLock { s -> ((any Channel)?, Bool) in
                s.children[id] = nil
                return (s.serverChannel, s.children.isEmpty && !s.stopping)
            }
            if last && !configuration.persistent {
                stop()
            } else {
                // A slot is free: resume accepting if the limiter was holding back.
                serverChannel?.read()
            }
        }
    }
}

/// Sits in the listening channel's pipeline: counts accepted connections and withholds
/// `read()` (that is, `accept`) while the connection limit is reached, so further clients
/// wait in the backlog.
private final class AcceptLimiter: ChannelDuplexHandler {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel
    typealias OutboundIn = Never

    private let server: NBDServer

    init(server: NBDServer) {
        self.server = server
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        server.accepted(unwrapInboundIn(data))
        context.fireChannelRead(data)
    }

    func read(context: ChannelHandlerContext) {
        if server.canAccept { context.read() }
    }
}
