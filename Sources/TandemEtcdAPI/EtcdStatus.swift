/// TandemEtcdAPI — the etcd v3 wire API: its protobuf messages (generated from
/// `Protos/etcd`, see `dev/gen-protos.sh`), their conversion to and from TandemStore's
/// requests and responses, and etcd's error codes and texts. No transport lives here: the
/// registry server carries these messages over HTTP/2.
import SwiftProtobuf
import TandemRaft
import TandemStore

/// A gRPC status as etcd answers it. Clients (clientv3, etcdctl) match on `message`.
public struct EtcdStatus: Error, Equatable, CustomStringConvertible {
    /// gRPC status codes used by etcd.
    public enum Code: Int, Sendable {
        case invalidArgument = 3
        case deadlineExceeded = 4
        case notFound = 5
        case permissionDenied = 7
        case failedPrecondition = 9
        case resourceExhausted = 8
        case outOfRange = 11
        case unimplemented = 12
        case internalError = 13
        case unavailable = 14
        case unauthenticated = 16
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code) (\(code.rawValue)): \(message)" }

    public static let requestTooLarge = EtcdStatus(.invalidArgument, "etcdserver: request is too large")
    public static let noLeader = EtcdStatus(.unavailable, "etcdserver: no leader")
    public static let noSpace = EtcdStatus(.resourceExhausted, "etcdserver: mvcc: database space exceeded")
    public static let leaderChanged = EtcdStatus(.unavailable, "etcdserver: leader changed")
    public static let timedOut = EtcdStatus(.unavailable, "etcdserver: request timed out")
    public static let emptyKey = EtcdStatus(.invalidArgument, "etcdserver: key is not provided")

    public static let permissionDenied = EtcdStatus(.permissionDenied, "etcdserver: permission denied")

    public static let tooManyRequests = EtcdStatus(.resourceExhausted, "etcdserver: too many requests")

    // Membership (etcd's rpctypes: ErrGRPCMemberNotFound, ErrGRPCPeerURLExist, …).
    public static let memberNotFound = EtcdStatus(.notFound, "etcdserver: member not found")
    public static let memberExists = EtcdStatus(.failedPrecondition, "etcdserver: member ID already exist")
    public static let peerURLExists = EtcdStatus(.failedPrecondition, "etcdserver: Peer URLs already exists")
    public static let memberBadURLs = EtcdStatus(.invalidArgument, "etcdserver: given member URLs are invalid")
    /// etcd's ErrGPRCNotSupportedForLearner (Unavailable: clients try another member).
    public static let notSupportedForLearner = EtcdStatus(.unavailable, "etcdserver: rpc not supported for learner")
    public static let memberNotLearner = EtcdStatus(
        .failedPrecondition, "etcdserver: can only promote a learner member")
    /// etcd's ErrGRPCNotEnoughStartedMembers (--strict-reconfig-check).
    public static let notEnoughStartedMembers = EtcdStatus(
        .failedPrecondition, "etcdserver: re-configuration failed due to not enough started members")

    /// etcd's answer when Raft refuses a proposal or read. clientv3 retries "no leader" and
    /// "leader changed" on another member but backs off on "too many requests", so the
    /// distinction matters.
    public init(_ e: ProposalError) {
        switch e {
        case .noLeader, .notLeader: self = .noLeader
        case .leadershipTransferInProgress: self = .leaderChanged
        case .uncommittedLogFull: self = .tooManyRequests
        case .confChangeInProgress, .invalidConfChange: self.init(.failedPrecondition, "etcdserver: \(e)")
        case .learnerNotReady:
            self.init(.failedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader")
        case .notMember: self.init(.unavailable, "etcdserver: this member was removed from the cluster")
        }
    }

    /// etcd's status for a store error (`etcdserver/api/v3rpc/rpctypes/error.go`).
    public init(_ e: StoreError) {
        switch e {
        case .compacted, .futureRevision, .leaseTTLTooLarge: self.init(.outOfRange, e.message)
        case .leaseNotFound: self.init(.notFound, e.message)
        case .leaseExists, .tooManyMembers: self.init(.failedPrecondition, e.message)
        case .noSpace: self.init(.resourceExhausted, e.message)
        case .keyNotFound, .tooManyOps, .duplicateKey, .emptyKey: self.init(.invalidArgument, e.message)
        }
    }
}

/// Limits of the wire layer, with etcd's defaults.
public struct EtcdLimits: Sendable {
    /// etcd's `--max-request-bytes` (1.5 MiB).
    public var maxRequestBytes = 1_572_864
    /// Nesting of txns inside txns.
    public var maxTxnDepth = 8
    /// etcd's `--quota-backend-bytes` (2 GiB): writes that would take the store past it are
    /// refused with "database space exceeded" and the NOSPACE alarm is raised.
    public var quotaBackendBytes: Int64 = 2 << 30
    /// etcd's `--grpc-keepalive-min-time`: how often a client with calls open may PING
    /// without data in between (see PingEnforcement).
    public var keepaliveMinTimeNanos = PingEnforcement.defaultMinTimeNanos
    public init() {}
}

/// Decodes a request message, refusing oversized or malformed input with etcd's answers.
public func decodeRequest<M: SwiftProtobuf.Message>(
    _ type: M.Type, _ bytes: [UInt8], limits: EtcdLimits = EtcdLimits()
)
    throws(EtcdStatus) -> M
{
    guard bytes.count <= limits.maxRequestBytes else { throw .requestTooLarge }
    do {
        return try M(serializedBytes: bytes)
    } catch {
        throw EtcdStatus(.invalidArgument, "etcdserver: malformed \(M.protoMessageName): \(error)")
    }
}
