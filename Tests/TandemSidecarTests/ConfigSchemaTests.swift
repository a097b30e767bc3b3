import Foundation
import TandemConfig
import TandemLua
import Testing

/// The config schema is the one source of the reader's keys and of docs/config.md.
@Suite struct ConfigSchemaTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..")
        .standardized

    /// Each documented key, with its documented example, loads through the real reader — so a
    /// key the reference lists but the reader ignores or refuses fails here.
    @Test func everyKeysExampleLoads() throws {
        // The examples name policies relative to the config file: give them a policies/ next to it.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("schema-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.copyItem(
            at: Self.repo.appendingPathComponent("policies"), to: dir.appendingPathComponent("policies"))
        let file = dir.appendingPathComponent("config.lua").path
        try "".write(toFile: file, atomically: true, encoding: .utf8)  // the reader resolves paths from it
        var base = SidecarConfig(service: "users", instance: "users-1", appPort: 8080)
        base.identity.joinToken = "secret"  // allow rules and identity settings need one
        var loaded = 0
        for record in ConfigSchema.records {
            #expect(!record.fields.isEmpty, "\(record.name)")
            for field in record.fields {
                let pair = "\(field.name) = \(field.example)" + (field.with.isEmpty ? "" : ", \(field.with)")
                let source = record.context.replacingOccurrences(of: "%s", with: pair)
                do {
                    _ = try ConfigFile.load(source: source, name: file, base: base)
                    loaded += 1
                } catch {
                    Issue.record("\(record.title).\(field.name): \(source) → \(error.message)")
                }
            }
        }
        #expect(loaded > 100)
    }

    /// Every record a field points at exists, and every record but the top one is reachable.
    @Test func recordsAreLinked() {
        let names = Set(ConfigSchema.records.map(\.name))
        let referenced = Set(ConfigSchema.records.flatMap { $0.fields.compactMap(\.record) })
        #expect(referenced.isSubset(of: names))
        #expect(names.subtracting(referenced) == ["config"])
    }

    /// An unknown key is refused with the schema's keys as the hint.
    @Test func unknownKeysNameTheAllowedOnes() {
        let base = SidecarConfig(service: "users", instance: "users-1", appPort: 8080)
        #expect(throws: ConfigFile.Error.self) {
            try ConfigFile.load(
                source: "return { clusters = { users = { breaker = { ratio = 1 } } } }", name: "c.lua", base: base)
        }
        do {
            _ = try ConfigFile.load(
                source: "return { clusters = { users = { breaker = { ratio = 1 } } } }", name: "c.lua", base: base)
        } catch {
            let keys = ConfigSchema.record("breaker").keys.sorted().joined(separator: ", ")
            #expect(error.message == "c.lua: clusters.users.breaker.ratio: unknown setting; expected one of \(keys)")
        }
    }

    /// `rps` with Envoy's `max_tokens` knobs used to load with the latter silently ignored.
    @Test func aRateLimitMixingBothStylesIsRefused() {
        let base = SidecarConfig(service: "users", instance: "users-1", appPort: 8080)
        do {
            _ = try ConfigFile.load(
                source: #"return { routes = { { cluster = "x", rate_limit = { rps = 10, max_tokens = 5 } } } }"#,
                name: "c.lua", base: base)
            Issue.record("accepted")
        } catch {
            #expect(
                error.message
                    == "c.lua: routes[1].rate_limit.max_tokens: give rps and burst, or max_tokens, tokens_per_fill and fill_interval_ms, not both"
            )
        }
    }

    /// Every key has a LuaLS type, so editors complete and check config files.
    @Test func everyKeyHasALuaType() {
        for r in ConfigSchema.records {
            for f in r.fields { #expect(ConfigSchema.luaType(f) != nil, "\(r.name).\(f.name): \(f.type)") }
        }
        let defs = ConfigSchema.luaLSDefinitions()
        #expect(defs.contains("---@class tandem.config.breaker\n---@field consecutive_failures? integer"))
        #expect(defs.contains(#"---@field mode? "require"|"permissive"|"off""#))
        #expect(defs.contains("---@field policies? (string|tandem.config.policy)[]"))
    }

    @Test func theDefinitionFileIsCurrent() throws {
        let text = try String(contentsOf: Self.repo.appendingPathComponent("policies/tandem.d.lua"), encoding: .utf8)
        #expect(text == PolicyAPI.luaLSDefinitions() + ConfigSchema.luaLSDefinitions(), "run: make docs")
    }

    @Test func theConfigReferenceIsCurrent() throws {
        let text = try String(
            contentsOf: Self.repo.appendingPathComponent("docs/config.md"), encoding: .utf8)
        #expect(text == ConfigSchema.markdown(), "run: .build/debug/tandem docs config > docs/config.md")
    }
}
