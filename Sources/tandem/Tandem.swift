import ArgumentParser
import TandemLua

@main
struct Tandem: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandem",
        abstract: "Tandem: a service mesh with a built-in Raft registry, Lua policies and a deterministic simulator.",
        subcommands: [
            Run.self, SidecarCommand.self, Registry.self, KV.self, Lease.self, LockCommand.self, ElectCommand.self,
            Members.self, Services.self, Status.self, PolicyCommand.self, ConfigCommand.self, IdentityCommand.self,
            Sim.self, SimRegistry.self, DocsCommand.self,
            Version.self,
        ])
}

struct Version: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print Tandem's version and the LuaJIT it is linked with.")

    func run() throws {
        print("tandem 0.1.0-dev")
        print("lua: \(LuaRuntime.version() ?? "unavailable")")
    }
}
