import QCOW2Crypto

/// A LUKS key-slot change, as `qemu-img amend -o encrypt.state=…,encrypt.keyslot=…,
/// encrypt.new-secret=…,encrypt.old-secret=…,encrypt.iter-time=…` (QEMU's
/// `qcrypto_block_luks_amend_options`).
public struct KeySlotAmendment: Sendable {
    public enum State: String, Sendable { case active, inactive }

    /// `active` adds a passphrase, `inactive` erases key slots.
    public var state: State
    /// The slot to change (adding: default the first free one).
    public var keySlot: Int?
    /// Adding: the new passphrase.
    public var newSecret: SecretBytes?
    /// Erasing: erase the slots this passphrase opens.
    public var oldSecret: SecretBytes?
    /// Adding: PBKDF2 time in milliseconds (QEMU's default 2000).
    public var iterTime: UInt64?
    /// QEMU's `--force`: overwrite an active slot, erase the last active slot.
    public var force: Bool

    public init(state: State, keySlot: Int? = nil, newSecret: SecretBytes? = nil, oldSecret: SecretBytes? = nil,
                iterTime: UInt64? = nil, force: Bool = false) {
        self.state = state
        self.keySlot = keySlot
        self.newSecret = newSecret
        self.oldSecret = oldSecret
        self.iterTime = iterTime
        self.force = force
    }
}

extension DiskImage {
    /// Adds or erases LUKS key slots of the (writable) top image, with QEMU's checks and
    /// messages. `secret` is the passphrase the image was opened with: adding a slot needs
    /// the master key, which it unlocks.
    public func amendKeySlots(_ change: KeySlotAmendment, secret: SecretBytes?) throws {
        guard isWritable, case let .qcow2(layer) = layers[0] else {
            throw QCOW2Error.invalidArgument("\(path): amend needs a writable qcow2 image")
        }
        guard let encryption = layer.encryption, encryption.method == .luks, var header = encryption.luksHeader,
              let area = encryption.area
        else {
            throw QCOW2Error.invalidArgument("\(path): Amending encryption options requires a LUKS encrypted image")
        }
        let file = try files.handle(FileKey(layer: 0, dataFile: false))
        let read: LUKS1Header.KeyMaterialReader = { offset, length in
            let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
            guard !overflow, end <= area.length else {
                throw QCOW2Error.corrupt(path: layer.path, "LUKS key material lies outside the encryption header area")
            }
            return try file.read(count: length, at: area.offset + offset)
        }
        func write(_ w: LUKS1KeyMaterialWrite) throws {
            try file.write(w.bytes, at: area.offset + w.offset)
        }
        func writeHeader() throws {
            try file.write(header.serialized(), at: area.offset)
        }
        let slotRange = 0..<LUKS1Header.keySlotCount
        if let slot = change.keySlot, !slotRange.contains(slot) {
            throw QCOW2Error.invalidArgument("Invalid keyslot \(slot) specified, must be between 0 and \(LUKS1Header.keySlotCount - 1)")
        }
        switch change.state {
        case .active:
            guard let newSecret = change.newSecret else {
                throw QCOW2Error.invalidArgument("'new-secret' is required to activate a keyslot")
            }
            guard change.oldSecret == nil else {
                throw QCOW2Error.invalidArgument("'old-secret' must not be given when activating keyslots")
            }
            let slot: Int
            if let s = change.keySlot {
                slot = s
            } else {
                guard let free = header.keySlots.firstIndex(where: { !$0.isActive }) else {
                    throw QCOW2Error.invalidArgument("Can't add a keyslot - all keyslots are in use")
                }
                slot = free
            }
            if header.keySlots[slot].isActive {
                guard change.force else {
                    throw QCOW2Error.invalidArgument("Refusing to overwrite active keyslot \(slot) - please erase it first")
                }
                _ = try LayerEncryption.cryptoCall(layer.path) { () throws(CryptoError) in
                    try header.eraseKeySlot(slot, allowErasingLastSlot: true)
                }
            }
            guard let secret else { throw LayerEncryption.missingSecret(layer.path) }
            var old = secret.passphraseBytes()
            defer { SecretBytes.wipe(&old) }
            let unlocked: LUKS1Unlocked
            do { unlocked = try header.unlock(passphrase: old, readKeyMaterial: read) } catch let error as CryptoError {
                throw LayerEncryption.translate(error, layer.path)
            }
            var new = newSecret.passphraseBytes()
            defer { SecretBytes.wipe(&new) }
            let cost = PBKDF2Cost.iterTime(milliseconds: change.iterTime ?? 2000)
            let material = try LayerEncryption.cryptoCall(layer.path) { () throws(CryptoError) in
                try header.addKeySlot(passphrase: new, masterKey: unlocked.masterKey, slot: slot, cost: cost)
            }
            // QEMU's order: the key material first, then the header that activates it.
            try write(material)
            try file.sync()
            try writeHeader()
            try file.sync()
        case .inactive:
            guard change.newSecret == nil else {
                throw QCOW2Error.invalidArgument("'new-secret' must not be given when erasing keyslots")
            }
            guard change.iterTime == nil else {
                throw QCOW2Error.invalidArgument("'iter-time' must not be given when erasing keyslots")
            }
            var oldBytes = change.oldSecret?.passphraseBytes()
            defer { if oldBytes != nil { SecretBytes.wipe(&oldBytes!) } }
            func opens(_ slot: Int) throws -> Bool {
                guard let oldBytes else { return true }
                do {
                    return try header.openKeySlot(slot, passphrase: oldBytes, readKeyMaterial: read) != nil
                } catch let error as CryptoError {
                    throw LayerEncryption.translate(error, layer.path)
                }
            }
            let active = header.activeKeySlots.count
            var toErase: [Int]
            if let slot = change.keySlot {
                if oldBytes != nil, try !opens(slot) {
                    throw QCOW2Error.invalidArgument("Given keyslot \(slot) doesn't contain the given old password for erase operation")
                }
                guard change.force || header.keySlots[slot].isActive else {
                    throw QCOW2Error.invalidArgument("Given keyslot \(slot) is already erased (inactive) ")
                }
                guard change.force || active != 1 else {
                    throw QCOW2Error.invalidArgument("Attempt to erase the only active keyslot \(slot) which will erase all the data in the image irreversibly - refusing operation")
                }
                toErase = [slot]
            } else if oldBytes != nil {
                toErase = try header.activeKeySlots.filter { try opens($0) }
                guard !toErase.isEmpty else {
                    throw QCOW2Error.invalidArgument("No keyslots match given (old) password for erase operation")
                }
                guard change.force || toErase.count != active else {
                    throw QCOW2Error.invalidArgument("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
                }
            } else {
                throw QCOW2Error.invalidArgument("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
            }
            for slot in toErase where header.keySlots[slot].isActive {
                let garbage = try LayerEncryption.cryptoCall(layer.path) { () throws(CryptoError) in
                    try header.eraseKeySlot(slot, allowErasingLastSlot: true)
                }
                // QEMU's order: deactivate in the header first, then destroy the material.
                try writeHeader()
                try file.sync()
                try write(garbage)
                try file.sync()
            }
        }
    }
}
