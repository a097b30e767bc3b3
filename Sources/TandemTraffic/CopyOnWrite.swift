/// A value kept in one shared class instance and copied only when a shared copy is changed:
/// a struct with many reference-counted fields (`Route`, `Endpoint`) that the proxy hands on
/// several times per request costs a retain per copy instead of one per field. Equal when it
/// is the same instance, or else by value.
struct CopyOnWrite<Value> {
    /// Mutated only through `value`'s `_modify`, which copies it first when shared.
    private final class Box {
        var value: Value
        init(_ value: Value) { self.value = value }
    }

    private var box: Box

    init(_ value: Value) { box = Box(value) }

    var value: Value {
        get { box.value }
        _modify {
            if !isKnownUniquelyReferenced(&box) { box = Box(box.value) }
            yield &box.value
        }
    }

    fileprivate func shares(with other: CopyOnWrite) -> Bool { box === other.box }
}

extension CopyOnWrite: @unchecked Sendable where Value: Sendable {}

extension CopyOnWrite: Equatable where Value: Equatable {
    static func == (a: CopyOnWrite, b: CopyOnWrite) -> Bool { a.shares(with: b) || a.value == b.value }
}

extension CopyOnWrite: Hashable where Value: Hashable {
    func hash(into hasher: inout Hasher) { value.hash(into: &hasher) }
}
