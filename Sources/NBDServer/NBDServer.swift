import NIOCore
import NIOPosix
import QCOW2

/// Namespace of the NBD server (see docs/ARCHITECTURE.md).
public enum NBD {}
