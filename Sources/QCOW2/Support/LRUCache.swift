/// A least-recently-used cache with a cost budget (bytes, usually). Not thread-safe:
/// owners wrap it in a `Mutex`.
///
/// Entries live in a dictionary of nodes linked into a recency list through indices into
/// a node array, so every operation is O(1) and no per-entry object is allocated.
struct LRUCache<Key: Hashable, Value> {
    private struct Node {
        var key: Key
        var value: Value
        var cost: Int
        var prev: Int
        var next: Int
    }

    private var nodes: [Node] = []
    private var free: [Int] = []
    private var index: [Key: Int] = [:]
    private var head = -1  // most recent
    private var tail = -1  // least recent
    private(set) var totalCost = 0
    let budget: Int

    init(budget: Int) { self.budget = max(0, budget) }

    var count: Int { index.count }

    mutating func value(for key: Key) -> Value? {
        guard let i = index[key] else { return nil }
        moveToFront(i)
        return nodes[i].value
    }

    /// Inserts or replaces, then evicts least-recently-used entries until within budget
    /// (the newest entry is always kept, even if it alone exceeds the budget).
    mutating func insert(_ value: Value, for key: Key, cost: Int) {
        if let i = index[key] {
            totalCost += cost - nodes[i].cost
            nodes[i].value = value
            nodes[i].cost = cost
            moveToFront(i)
        } else {
            let node = Node(key: key, value: value, cost: cost, prev: -1, next: head)
            let i: Int
            if let f = free.popLast() {
                nodes[f] = node
                i = f
            } else {
                nodes.append(node)
                i = nodes.count - 1
            }
            if head >= 0 { nodes[head].prev = i }
            head = i
            if tail < 0 { tail = i }
            index[key] = i
            totalCost += cost
        }
        while totalCost > budget, tail >= 0, tail != head { evict(tail) }
    }

    @discardableResult
    mutating func removeValue(for key: Key) -> Value? {
        guard let i = index[key] else { return nil }
        let v = nodes[i].value
        evict(i)
        return v
    }

    mutating func removeAll() {
        nodes.removeAll()
        free.removeAll()
        index.removeAll()
        head = -1
        tail = -1
        totalCost = 0
    }

    /// Removes every entry whose key matches.
    mutating func removeAll(where predicate: (Key) -> Bool) {
        for (k, _) in index where predicate(k) { removeValue(for: k) }
    }

    private mutating func unlink(_ i: Int) {
        let p = nodes[i].prev, n = nodes[i].next
        if p >= 0 { nodes[p].next = n } else { head = n }
        if n >= 0 { nodes[n].prev = p } else { tail = p }
        nodes[i].prev = -1
        nodes[i].next = -1
    }

    private mutating func moveToFront(_ i: Int) {
        guard head != i else { return }
        unlink(i)
        nodes[i].next = head
        if head >= 0 { nodes[head].prev = i }
        head = i
        if tail < 0 { tail = i }
    }

    private mutating func evict(_ i: Int) {
        unlink(i)
        index[nodes[i].key] = nil
        totalCost -= nodes[i].cost
        free.append(i)
    }
}
