// agentgate interception: cgroup programs attached to the agentgate cgroup tree.
//
// connect4/6   TCP connects of enrolled processes are rewritten to the local proxy; the
//              original destination and the connecting process are remembered by socket
//              cookie. Destinations that are not configured targets follow AG_MODE.
// sockops      once the connect has a local port, the record is also keyed by the
//              client's local addr:port: what the proxy sees as its peer after accept().
// sendmsg4/6   UDP only to configured DNS resolvers (connect4/6 cover connected UDP).
// sock_create  raw and ICMP sockets refused (AF_PACKET needs CAP_NET_RAW, which enrolled
//              processes do not keep).
// exec/exit    tracepoints for processes in the tree (an enrolled cgroup or below it),
//              through a ring buffer; reservation
//              failures are counted in `lost`, never silent.
// cgroup_mkdir a watched cgroup (an enrolled unit's) is enrolled as it is made.
// unix          connect_unix/sendmsg_unix (kernel 6.7+; built with AG_UNIX_HOOKS): unix sockets
//              only by the paths and abstract names allowed.
//
// The cgroup programs may be attached above an enrolled cgroup (to its parent, so that
// the cgroup a restarted unit gets anew is covered from its first instruction): each
// one lets processes outside the tree be.
//
// Only UAPI context structs and helpers, so headers of a nearby kernel compile it.
// Options come as -D cflags from hostagent/intercept/loader.py:
//   AG_PROXY_IP4 (network order u32), AG_PROXY_PORT (network order u16),
//   AG_MODE (0 deny, 1 record, 2 allow), AG_PIN (string: pin directory of shared maps).

#include <uapi/linux/bpf.h>

#ifndef AG_PROXY_IP4
#error "AG_PROXY_IP4 must be given"
#endif
#ifndef AG_PROXY_PORT
#error "AG_PROXY_PORT must be given"
#endif
#ifndef AG_MODE
#define AG_MODE 0
#endif

#define AG_AF_INET 2
#define AG_AF_INET6 10
#define AG_SOCK_STREAM 1
#define AG_SOCK_DGRAM 2
#define AG_SOCK_RAW 3
#define AG_IPPROTO_ICMP 1
#define AG_IPPROTO_TCP 6
#define AG_IPPROTO_UDP 17
#define AG_IPPROTO_ICMPV6 58

// actions recorded per connection
#define ACT_TARGET 1   // a configured target: proxied with its protocol
#define ACT_RECORD 2   // not a target, mode record: proxied as raw TCP
// event types
#define EV_EXEC 1
#define EV_EXIT 2
#define EV_DENY_CONNECT 3
#define EV_ALLOW_DIRECT 4
#define EV_DENY_UDP 5
#define EV_DENY_SOCKET 6
#define EV_EXEC_OUTSIDE 7   // exec outside the tree, reported for uid/exe enrollment
#define EV_DENY_BIND 8
#define EV_DENY_UNIX 9
#define AG_SIGSTOP 19
#define FLAG_STOPPED 1      // the process was stopped at exec, for the daemon to enroll

// An address as 16 bytes: IPv4 as v4-mapped IPv6, so one key type serves both.
struct addr_key {
    __u32 addr[4];
    __u16 port;        // network order
    __u16 pad;
};

struct conn_info {
    __u64 cookie;
    __u64 cgroup_id;
    __u64 ktime_ns;
    __u32 tgid;
    __u32 tid;
    __u32 uid;
    __u32 gid;
    struct addr_key orig;   // original destination
    __u32 action;
    __u32 family;           // the socket's family (AF_INET or AF_INET6)
    char comm[16];
};

struct event {
    __u32 type;
    __u32 tgid;
    __u32 flags;
    __u32 uid;
    __u64 cgroup_id;
    __u64 ktime_ns;
    struct addr_key addr;
    char comm[16];
    char filename[128];
};

BPF_TABLE_PINNED("hash", struct addr_key, __u32, targets, 4096, AG_PIN "/targets");
BPF_TABLE_PINNED("hash", struct addr_key, __u32, resolvers, 64, AG_PIN "/resolvers");
BPF_TABLE_PINNED("lru_hash", __u64, struct conn_info, conns, 65536, AG_PIN "/conns");
BPF_TABLE_PINNED("lru_hash", struct addr_key, struct conn_info, peers, 65536, AG_PIN "/peers");
BPF_TABLE_PINNED("hash", __u64, __u32, enrolled, 65536, AG_PIN "/enrolled");
BPF_RINGBUF_OUTPUT(events, 256);
BPF_ARRAY(settings, __u32, 1);   // [0] = 1: report every exec (uid/exe enrollment)

// Enrollment on exec: a process exec'ing as one of these users, or one of these paths,
// is stopped (SIGSTOP) before its first instruction; the daemon moves it into the tree
// and continues it. With the daemon gone it stays stopped: fail closed.
struct path_key {
    char path[128];
};
BPF_HASH(stop_uids, __u32, __u32, 1024);
BPF_HASH(stop_exes, struct path_key, __u32, 1024);
BPF_PERCPU_ARRAY(lost, __u64, 1);
// cgroup paths (under the cgroup2 mount) enrolled whenever they are made
BPF_TABLE_PINNED("hash", struct path_key, __u32, watched, 1024, AG_PIN "/watched");
#ifdef AG_UNIX_HOOKS
// who was sent to the proxy's unix sockets, by process: the proxy finds the peer's
// record by its SO_PEERCRED pid (its attestation, as `peers` is for TCP). A record goes
// with its process (sched_process_exit): a pid used again is nobody's.
BPF_TABLE_PINNED("lru_hash", __u32, struct conn_info, unix_conns, 16384, AG_PIN "/unix_conns");
#endif

#define AG_MAX_DEPTH 16

// The enrolled cgroup the current process is in or below (0: none). A unit's own
// sub-cgroups, or one an agent made under its run's, are in the tree too, and their
// events go to the same run: the deepest enrolled ancestor is the one that counts.
static __always_inline __u64 tree_cgroup(void)
{
    __u64 cg = bpf_get_current_cgroup_id();
    if (enrolled.lookup(&cg))
        return cg;
    __u64 found = 0;
#pragma unroll
    for (int level = 1; level < AG_MAX_DEPTH; level++) {
        __u64 anc = bpf_get_current_ancestor_cgroup_id(level);
        if (anc == 0 || anc == cg)
            break;
        if (enrolled.lookup(&anc))
            found = anc;
    }
    return found;
}

// Refusals an agent can cause at will (a connect loop) are events of its own making: at
// most AG_GUARD_PER_SEC a second per enrolled cgroup reach the ring buffer, the rest
// are counted (guard_suppressed, reported at the run's end), so one agent can't crowd
// out another run's exec events, nor its own.
#ifndef AG_GUARD_PER_SEC
#define AG_GUARD_PER_SEC 200
#endif
struct guard_window {
    __u64 start_ns;
    __u64 count;
};
BPF_HASH(guard_rate, __u64, struct guard_window, 16384);
BPF_HASH(guard_suppressed, __u64, __u64, 16384);

static __always_inline int guard_admit(__u64 cg)
{
    __u64 now = bpf_ktime_get_ns();
    struct guard_window *w = guard_rate.lookup(&cg);
    if (!w || now - w->start_ns >= 1000000000ull) {
        struct guard_window fresh = {now, 1};
        guard_rate.update(&cg, &fresh);
        return 1;
    }
    if (w->count < AG_GUARD_PER_SEC) {
        __sync_fetch_and_add(&w->count, 1);
        return 1;
    }
    __u64 one = 1;
    __u64 *n = guard_suppressed.lookup(&cg);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        guard_suppressed.update(&cg, &one);
    return 0;
}

// A ring buffer event with who and when filled in; NULL (counted in `lost`) if full.
static __always_inline struct event *new_event(__u32 type, __u64 cg)
{
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        int zero = 0;
        __u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return 0;
    }
    __u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->tgid = id >> 32;
    e->flags = 0;
    e->uid = (__u32)bpf_get_current_uid_gid();
    e->cgroup_id = cg ? cg : bpf_get_current_cgroup_id();
    e->ktime_ns = bpf_ktime_get_ns();
    __builtin_memset(&e->addr, 0, sizeof(e->addr));
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    e->filename[0] = 0;
    return e;
}

static __always_inline void emit(__u32 type, struct addr_key *addr)
{
    __u64 cg = tree_cgroup();
    if (type != EV_EXIT && !guard_admit(cg))
        return;
    struct event *e = new_event(type, cg);
    if (!e)
        return;
    if (addr)
        __builtin_memcpy(&e->addr, addr, sizeof(*addr));
    events.ringbuf_submit(e, 0);
}

static __always_inline int is_proxy(struct addr_key *k)
{
    if (k->port != AG_PROXY_PORT)
        return 0;
    if (k->addr[0] == 0 && k->addr[1] == 0 && k->addr[2] == bpf_htonl(0xffff)
        && k->addr[3] == AG_PROXY_IP4)
        return 1;
    return k->addr[0] == 0 && k->addr[1] == 0 && k->addr[2] == 0 && k->addr[3] == bpf_htonl(1);
}

static __always_inline int is_v4mapped(__u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

// 1: allow the connect as it is; 0: refuse (EPERM); 2: rewritten to the proxy.
static __always_inline int decide_tcp(struct bpf_sock_addr *ctx, struct addr_key *dst)
{
    if (is_proxy(dst))
        return 1;      // straight to the proxy: it refuses peers it has no record of
    __u32 action = ACT_TARGET;
    if (!targets.lookup(dst)) {
        struct addr_key any = *dst;
        any.port = 0;  // a target may name an address with every port
        if (!targets.lookup(&any)) {
            if (AG_MODE == 0) {
                emit(EV_DENY_CONNECT, dst);
                return 0;
            }
            if (AG_MODE == 2) {
                emit(EV_ALLOW_DIRECT, dst);
                return 1;
            }
            action = ACT_RECORD;
        }
    }
    struct conn_info ci = {};
    __u64 id = bpf_get_current_pid_tgid();
    __u64 ug = bpf_get_current_uid_gid();
    ci.cookie = bpf_get_socket_cookie(ctx);
    ci.cgroup_id = bpf_get_current_cgroup_id();
    ci.ktime_ns = bpf_ktime_get_ns();
    ci.tgid = id >> 32;
    ci.tid = (__u32)id;
    ci.uid = (__u32)ug;
    ci.gid = ug >> 32;
    ci.orig = *dst;
    ci.action = action;
    ci.family = ctx->family;
    bpf_get_current_comm(&ci.comm, sizeof(ci.comm));
    conns.update(&ci.cookie, &ci);
    return 2;
}

static __always_inline int dns_allowed(struct addr_key *dst)
{
    return resolvers.lookup(dst) != 0;
}

static __always_inline void key4(struct bpf_sock_addr *ctx, struct addr_key *k)
{
    k->addr[2] = bpf_htonl(0xffff);
    k->addr[3] = ctx->user_ip4;
    k->port = (__u16)ctx->user_port;
}

static __always_inline void key6(struct bpf_sock_addr *ctx, struct addr_key *k)
{
    k->addr[0] = ctx->user_ip6[0];
    k->addr[1] = ctx->user_ip6[1];
    k->addr[2] = ctx->user_ip6[2];
    k->addr[3] = ctx->user_ip6[3];
    k->port = (__u16)ctx->user_port;
}

// UDP (sendmsg, or connect on a datagram socket): only to the DNS resolvers.
static __always_inline int udp_verdict(struct addr_key *dst)
{
    if (dns_allowed(dst))
        return 1;
    emit(EV_DENY_UDP, dst);
    return 0;
}

int ag_connect4(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key dst = {};
    key4(ctx, &dst);
    if (ctx->type == AG_SOCK_DGRAM)
        return udp_verdict(&dst);
    if (ctx->type != AG_SOCK_STREAM)
        return 0;
    int verdict = decide_tcp(ctx, &dst);
    if (verdict == 2) {
        ctx->user_ip4 = AG_PROXY_IP4;
        ctx->user_port = AG_PROXY_PORT;
        return 1;
    }
    return verdict;
}

int ag_connect6(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key dst = {};
    key6(ctx, &dst);
    if (ctx->type == AG_SOCK_DGRAM)
        return udp_verdict(&dst);
    if (ctx->type != AG_SOCK_STREAM)
        return 0;
    int verdict = decide_tcp(ctx, &dst);
    if (verdict == 2) {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        if (is_v4mapped(dst.addr)) {     // dual-stack socket to an IPv4 address
            ctx->user_ip6[2] = bpf_htonl(0xffff);
            ctx->user_ip6[3] = AG_PROXY_IP4;
        } else {
            ctx->user_ip6[2] = 0;
            ctx->user_ip6[3] = bpf_htonl(1);
        }
        ctx->user_port = AG_PROXY_PORT;
        return 1;
    }
    return verdict;
}

int ag_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key dst = {};
    key4(ctx, &dst);
    return udp_verdict(&dst);
}

int ag_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key dst = {};
    key6(ctx, &dst);
    return udp_verdict(&dst);
}

// An allowlist: TCP streams and UDP datagrams only (no raw, ICMP, SCTP, MPTCP, ...).
int ag_sock_create(struct bpf_sock *sk)
{
    if (!tree_cgroup())
        return 1;
    __u32 type = sk->type, protocol = sk->protocol;
    if ((type == AG_SOCK_STREAM && (protocol == 0 || protocol == AG_IPPROTO_TCP))
        || (type == AG_SOCK_DGRAM && (protocol == 0 || protocol == AG_IPPROTO_UDP)))
        return 1;
    emit(EV_DENY_SOCKET, 0);
    return 0;
}

// No listening for the outside world: binds with a port are allowed on loopback only.
// (Port 0 is a source-address choice for an outgoing connect, which is judged there.)
int ag_bind4(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key k = {};
    key4(ctx, &k);
    if (k.port == 0 || (bpf_ntohl(k.addr[3]) >> 24) == 127)
        return 1;
    emit(EV_DENY_BIND, &k);
    return 0;
}

int ag_bind6(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    struct addr_key k = {};
    key6(ctx, &k);
    if (k.port == 0)
        return 1;
    if (k.addr[0] == 0 && k.addr[1] == 0 && k.addr[2] == 0 && k.addr[3] == bpf_htonl(1))
        return 1;   // ::1
    if (is_v4mapped(k.addr) && (bpf_ntohl(k.addr[3]) >> 24) == 127)
        return 1;
    emit(EV_DENY_BIND, &k);
    return 0;
}

int ag_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB && skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct conn_info *ci = conns.lookup(&cookie);
    if (!ci)
        return 1;
    // Every ctx field is read unconditionally: the verifier refuses ctx loads that the
    // compiler merges behind a branch into a modified pointer.
    __u32 family = skops->family;
    __u32 ip4 = skops->local_ip4;
    __u32 ip6_0 = skops->local_ip6[0], ip6_1 = skops->local_ip6[1];
    __u32 ip6_2 = skops->local_ip6[2], ip6_3 = skops->local_ip6[3];
    __u32 port = skops->local_port;                       // host order in sock_ops
    struct addr_key local = {};
    if (family == AG_AF_INET) {
        local.addr[2] = bpf_htonl(0xffff);
        local.addr[3] = ip4;
    } else {
        local.addr[0] = ip6_0;
        local.addr[1] = ip6_1;
        local.addr[2] = ip6_2;
        local.addr[3] = ip6_3;
    }
    local.port = bpf_htons((__u16)port);
    peers.update(&local, ci);
    return 1;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    __u32 type = EV_EXEC;
    __u64 tree = tree_cgroup();
    if (!tree) {
        int zero = 0;
        __u32 *all = settings.lookup(&zero);
        if (!all || !*all)
            return 0;
        type = EV_EXEC_OUTSIDE;
    }
    struct event *e = new_event(type, tree);
    if (!e)
        return 0;
    unsigned short off = args->data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(&e->filename, sizeof(e->filename), (char *)args + off);
    if (type == EV_EXEC_OUTSIDE) {
        struct path_key pk = {};
        bpf_probe_read_kernel_str(&pk.path, sizeof(pk.path), (char *)args + off);
        __u32 uid = e->uid;
        if (stop_uids.lookup(&uid) || stop_exes.lookup(&pk)) {
            bpf_send_signal(AG_SIGSTOP);
            e->flags = FLAG_STOPPED;
        }
    }
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    __u64 id = bpf_get_current_pid_tgid();
    if ((__u32)id != (id >> 32))
        return 0;   // a thread, not the process
#ifdef AG_UNIX_HOOKS
    __u32 tgid = id >> 32;
    unix_conns.delete(&tgid);
#endif
    if (!tree_cgroup())
        return 0;
    emit(EV_EXIT, 0);
    return 0;
}

// cgroup:cgroup_mkdir and cgroup:cgroup_rename as their format files lay them out
struct cgroup_path_args {
    __u64 common;
    int root;
    int level;
    __u64 id;
    __u32 data_loc_path;
};

// Enrolled in the mkdir (or the rename) itself: it holds cgroup_mutex, as a write to
// cgroup.procs must, so no process is in the cgroup before it is enrolled. Loaded
// through a pinned link (loader.py): it goes on while the daemon is down, when an
// enrolled connect fails (no proxy) rather than leaves.
int ag_cgroup_made(struct cgroup_path_args *args)
{
    if (args->root != 0)    // a cgroup v1 hierarchy of a hybrid host
        return 0;
    struct path_key pk = {};
    unsigned short off = args->data_loc_path & 0xFFFF;
    bpf_probe_read_kernel_str(&pk.path, sizeof(pk.path), (char *)args + off);
    if (!watched.lookup(&pk))
        return 0;
    __u64 id = args->id;
    __u32 one = 1;
    enrolled.update(&id, &one);
    return 0;
}

#ifdef AG_UNIX_HOOKS
// Unix-domain sockets, by the address the caller gave (a path as written, or an abstract
// name). What a path resolves to is the mount namespace's concern (unixguard.py): a
// symlink or a relative path is judged as written, so refused unless allowed as such.
//
// The address is reached through two kfuncs bcc can't call by name: these placeholders
// compile to helper calls with these numbers, which loader.py rewrites into kfunc calls
// to the ids vmlinux's BTF gives (AG_SOCKADDR_UN_ID is struct sockaddr_un's).
#define AG_KFUNC_CAST_TO_KERN_CTX 0x7ff0
#define AG_KFUNC_RDONLY_CAST 0x7ff1
#define AG_KFUNC_SET_SUN_PATH 0x7ff2
static void *(*ag_cast_to_kern_ctx)(void *ctx) = (void *)AG_KFUNC_CAST_TO_KERN_CTX;
static void *(*ag_rdonly_cast)(void *obj, __u32 btf_id) = (void *)AG_KFUNC_RDONLY_CAST;
static int (*ag_set_sun_path)(void *kern, const char *path, __u32 len) =
    (void *)AG_KFUNC_SET_SUN_PATH;

// struct bpf_sock_addr_kern's first fields; uaddrlen is at AG_UADDRLEN_OFF (from BTF:
// the verifier checks every offset against it)
struct ag_sock_addr_kern {
    void *sk;
    void *uaddr;
};

#define AG_SUN_PATH 108

// The address as a key: a path, or an abstract name as '@' and the name (NULs in it
// kept), zero-padded. `len` is its length in bytes for the exact names (a hash), in
// bits for the prefixes ("/run/user/*": an LPM trie).
struct unix_key {
    __u32 len;
    char name[AG_SUN_PATH + 4];   // 14 words: the name, then zeros
};
BPF_HASH(unix_exact, struct unix_key, __u32, 1024);
// a target's unix socket path -> the proxy's socket for that target: the connect is
// rewritten there, as connect4/6 rewrite a target's address to the proxy
struct unix_dest {
    __u32 len;
    char path[AG_SUN_PATH];
};
BPF_HASH(unix_redirect, struct unix_key, struct unix_dest, 64);
BPF_F_TABLE("lpm_trie", struct unix_key, __u32, unix_prefix, 1024, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(unix_scratch, struct unix_key, 1);
BPF_PERCPU_ARRAY(unix_ci_scratch, struct conn_info, 1);


static __always_inline int unix_verdict(struct bpf_sock_addr *ctx)
{
    if (!tree_cgroup())
        return 1;
    int zero = 0;
    struct unix_key *k = unix_scratch.lookup(&zero);
    if (!k)
        return 0;
    struct ag_sock_addr_kern *kern = ag_cast_to_kern_ctx(ctx);
    char *sun = ag_rdonly_cast(kern->uaddr, AG_SOCKADDR_UN_ID);
    // the address's length as given, with sun_family's 2 bytes; the bytes after it are
    // not the caller's (the kernel's buffer is not cleared)
    __u32 n = *(__u32 *)((char *)kern + AG_UADDRLEN_OFF);
    n = n > 2 ? n - 2 : 0;
    if (n > AG_SUN_PATH)
        n = AG_SUN_PATH;
    int abstract = n > 0 && sun[2] == 0;
    // Copied a word at a time (byte loops unrolled took seconds to compile): 13 words
    // and 4 bytes are sun_path's 108. A path ends at its first NUL, an abstract name
    // is all n bytes; what follows is zeroed, so equal names are equal keys.
    __u64 *words = (__u64 *)k->name;
    __u32 len = n, found = abstract;
#pragma unroll
    for (int w = 0; w < 14; w++) {
        __u64 v = w < 13 ? *(__u64 *)(sun + 2 + 8 * w) : *(__u32 *)(sun + 2 + 104);
        if (!found && ((v - 0x0101010101010101ull) & ~v & 0x8080808080808080ull)) {
            found = 1;
#pragma unroll
            for (int b = 0; b < 8; b++) {
                if (((v >> (8 * b)) & 0xff) == 0 && len == n && (__u32)(8 * w + b) < n) {
                    len = 8 * w + b;
                    break;
                }
            }
        }
        words[w] = v;
    }
#pragma unroll
    for (int w = 0; w < 14; w++) {
        __u32 start = 8 * w;
        if (start >= len)
            words[w] = 0;
        else if (len - start < 8)
            words[w] &= (1ull << (8 * (len - start))) - 1;
    }
    // A path is judged as written, so it must be written plainly: absolute, without
    // '.' or '..' segments or empty ones ('//'), not ending in '/' (else an allowed
    // prefix could climb out of its directory: /run/allowed/../../x).
    // Each '/' looked at with the three bytes after it (the key is zero after the
    // name): '//', '/./', '/../', the same at the end, and a trailing '/'. Not
    // unrolled (that outgrows the stack); the length waits in the key meanwhile, so
    // the paths that reach the loop, one per length, are one state to the verifier.
    k->len = len;
    __u32 bad = 0;
    if (!abstract) {
        const __u8 *nm = (const __u8 *)k->name;
        bad = nm[0] != '/';
#pragma clang loop unroll(disable)
        for (int i = 0; i < AG_SUN_PATH - 1; i++) {
            if (nm[i] != '/')
                continue;
            __u8 c1 = nm[i + 1], c2 = nm[i + 2], c3 = nm[i + 3];
            if (c1 == '/' || (c1 == 0 && i > 0) ||
                (c1 == '.' && (c2 == '/' || c2 == 0 || (c2 == '.' && (c3 == '/' || c3 == 0)))))
                bad = 1;
        }
        bad |= nm[AG_SUN_PATH - 1] == '/';
    }
    len = k->len;
    // an abstract name's key starts with its NUL, a path's with '/': they never meet
    if (bad)
        goto refuse;
    struct unix_dest *dest = unix_redirect.lookup(k);
    if (dest) {
        __u32 dlen = dest->len;
        if (dlen > AG_SUN_PATH)
            return 0;
        // two separate tests, kept apart: merged into one (dlen - 1 > 107) the verifier
        // would not know dlen's bounds at the call
        asm volatile("" : "+r"(dlen));
        if (dlen == 0)
            return 0;
        if (ag_set_sun_path(kern, dest->path, dlen) != 0)
            return 0;
        struct conn_info *ci = unix_ci_scratch.lookup(&zero);   // (the stack is small)
        if (!ci)
            return 0;
        __u64 id = bpf_get_current_pid_tgid();
        __u64 ug = bpf_get_current_uid_gid();
        ci->cookie = bpf_get_socket_cookie(ctx);
        ci->cgroup_id = bpf_get_current_cgroup_id();
        ci->ktime_ns = bpf_ktime_get_ns();
        ci->tgid = id >> 32;
        ci->tid = (__u32)id;
        ci->uid = (__u32)ug;
        ci->gid = ug >> 32;
        __builtin_memset(&ci->orig, 0, sizeof(ci->orig));
        ci->action = ACT_TARGET;
        ci->family = 1;   // AF_UNIX
        bpf_get_current_comm(&ci->comm, sizeof(ci->comm));
        __u32 tgid = ci->tgid;
        unix_conns.update(&tgid, ci);
        return 1;
    }
    if (unix_exact.lookup(k))
        return 1;
    k->len = len * 8;
    if (unix_prefix.lookup(k))
        return 1;
refuse:
    if (!guard_admit(tree_cgroup()))
        return 0;
    struct event *e = new_event(EV_DENY_UNIX, tree_cgroup());
    if (!e)
        return 0;
    __builtin_memcpy(e->filename, k->name, AG_SUN_PATH + 4);
    events.ringbuf_submit(e, 0);
    return 0;
}

// One program, loaded twice: for connect_unix and for sendmsg_unix (loader.py); its
// compile is the slow part of loading these programs, so it is compiled once.
int ag_unix(struct bpf_sock_addr *ctx)
{
    return unix_verdict(ctx);
}
#endif
