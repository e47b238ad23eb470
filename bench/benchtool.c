/*
 * benchtool: small loopback load helpers for bench/run (compiled by bench/run
 * with gcc into bench/.build/benchtool). Only ever talks to the host given on
 * the command line (the harness always passes 127.0.0.1). Every loop is
 * bounded in time and in count.
 *
 *   benchtool echo MAX_SECONDS PORT [PORT...]
 *       epoll echo server on 127.0.0.1:PORT...; exits after MAX_SECONDS.
 *   benchtool echo1 MAX_SECONDS PORT [PORT...]
 *       the same, but a connection whose first read is a single byte is closed
 *       right after its echo: the server closes first, so the proxy's ephemeral
 *       ports never sit in TIME_WAIT (a million short connections through a
 *       proxy need that); longer messages (ping-pong) are echoed as by echo.
 *   benchtool conns HOST PORT COUNT CONCURRENCY BASE RANGE seq|rand MAX_SECONDS
 *       COUNT short connections, CONCURRENCY at a time, each from its own
 *       source address 127.x.y.z (address number BASE+i for seq, BASE+random
 *       in [0, RANGE) for rand; number k is 127.1.0.0 + k): connect, send 1
 *       byte, read it back, read to EOF, close. Prints one JSON line: count,
 *       errors, seconds, and percentiles (us) of connect-to-echo latency.
 *   benchtool idle HOST PORT MAX_CONNS
 *       idle-connection client driven by commands on stdin, one per line:
 *         open N   -> open connections until N are established   -> "ok N"
 *         ping M   -> 1-byte round trip on the first M connections -> "ok M"
 *         quit     -> close everything (RST) and exit; so does EOF
 *       replies "fail <reason>" on error; every command times out after 60 s.
 *   benchtool pingpong HOST PORT SECONDS SIZE MAX_COUNT WARMUP
 *       closed loop on one connection: write SIZE bytes, read SIZE bytes back,
 *       repeat; prints one JSON line with rps and latency percentiles (us).
 *   benchtool grpc MAX_SECONDS PORT [PORT...]
 *       minimal h2c gRPC server on 127.0.0.1:PORT...: answers every request
 *       stream (whatever its :path) with 200, content-type application/grpc,
 *       one small gRPC message (a ConfigResponse carrying a session_id) and
 *       the trailer grpc-status: 0. Request headers are not decoded (no
 *       HPACK state is needed for that); SETTINGS and PING are acknowledged,
 *       the receive window is replenished. Exits after MAX_SECONDS.
 *   benchtool grpccalls HOST PORT BODY_FILE COUNT IN_FLIGHT BASE MAX_SECONDS
 *       COUNT unary gRPC calls on one h2c connection to
 *       /spark.connect.SparkConnectService/Config, IN_FLIGHT at a time; the body
 *       is BODY_FILE (a gRPC-framed Spark request whose session id, a UUID, sits
 *       at byte 7) with the session id's last 12 hex digits replaced by BASE+i,
 *       so every call opens a new Spark session. A call is ok when its response
 *       has a DATA frame before END_STREAM (a gRPC error is trailers-only).
 *       Prints one JSON line: count, errors, seconds, calls/s, percentiles (us).
 *   benchtool grpcconc HOST PORT BODY_FILE CONNS ADDR_BASE SESSION_BASE RATE WARMUP_S WINDOW_S
 *       CONNS concurrent Spark sessions, one h2c connection each (as PySpark keeps
 *       one channel per session), connection i from source address ADDR_BASE+i
 *       (as conns) and its calls carrying session id SESSION_BASE+i (as grpccalls).
 *       Each connection opens with one call (its session's first), then unary
 *       Config calls with at most one in flight per connection, in two phases of
 *       WARMUP_S + WINDOW_S seconds: "paced" (RATE calls/s offered over all
 *       connections, latency counted from when a call was due; skipped if RATE
 *       is 0), then "closed" (each connection calls again as soon as its call
 *       returns). A call is OK when it gets :status 200, a DATA frame and
 *       grpc-status 0 (response headers are decoded with libnghttp2's HPACK
 *       inflater); anything else, RST_STREAM included, is an error; a reset, EOF
 *       or GOAWAY loses the connection. Prints "window NAME start|end" lines at
 *       the window's edges (for the caller to sample a proxy's CPU), then one
 *       JSON line: per phase count, calls/s, errors, lost connections, calls
 *       unfinished after a 10 s drain, paced calls never sent ("behind"), PINGs
 *       the server sent in the window (each a round trip the client answers), and
 *       latency percentiles (us) of the calls that completed in the window.
 *   benchtool memcpy
 *       prints memcpy bandwidth (cache-resident 64 KiB and 256 MiB), a quick
 *       indicator of how loaded the shared VM is.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CMD_TIMEOUT_S 60.0
#define MAX_PENDING_CONNECTS 256
#define FD_LIMIT 65536

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "benchtool: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static struct sockaddr_in make_addr(const char *host, int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "benchtool: bad IPv4 address %s\n", host);
        exit(2);
    }
    return sa;
}

/* A server's start: raises the fd limit, then listens on 127.0.0.1:PORT for each of
 * argv[1..argc) (argv[0] is not a port), non-blocking, registered for EPOLLIN in a new epoll
 * set (returned) and marked in is_listener. */
static int listen_all(int argc, char **argv, unsigned char *is_listener) {
    raise_nofile();
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 1; i < argc; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        struct sockaddr_in sa = make_addr("127.0.0.1", atoi(argv[i]));
        if (fd < 0) die("socket");
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
        if (listen(fd, 4096) < 0) die("listen");
        set_nonblock(fd);
        is_listener[fd] = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
    return ep;
}

/* The next client waiting on listener `lfd`, non-blocking with TCP_NODELAY, or -1 when there
 * is none. Clients whose fd would not fit the servers' FD_LIMIT tables are closed. */
static int accept_client(int lfd) {
    for (int k = 0; k < 1024; k++) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0) return -1;
        if (c >= FD_LIMIT) { close(c); continue; }
        set_nodelay(c);
        return c;
    }
    return -1;
}

/* Write all of buf, waiting (bounded) if the socket is non-blocking. */
static int write_all(int fd, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 5000) <= 0) return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ echo server */

static int cmd_echo(int argc, char **argv, int close_after_echo) {
    if (argc < 2) {
        fprintf(stderr, "usage: benchtool echo|echo1 MAX_SECONDS PORT...\n");
        return 2;
    }
    double deadline = now_s() + atof(argv[0]);
    static unsigned char is_listener[FD_LIMIT];
    static char buf[65536];
    static unsigned char seen[FD_LIMIT]; /* echo1: the connection has had its first read */
    int ep = listen_all(argc, argv, is_listener);
    struct epoll_event evs[256];
    while (now_s() < deadline) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (is_listener[fd]) {
                for (int k = 0; k < 1024; k++) {
                    int c = accept_client(fd);
                    if (c < 0) break;
                    seen[c] = 0;
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) < 0) close(c);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                int first_byte_only = close_after_echo && !seen[fd] && r == 1;
                seen[fd] = 1;
                if (write_all(fd, buf, (size_t)r) < 0 || first_byte_only) close(fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd); /* also removes it from the epoll set */
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------- h2c gRPC server */

#define H2_PREFACE_LEN 24
#define GRPC_MAX_IN (1 << 20)

struct h2conn {
    int fd;
    int preface_done;
    size_t len, cap;
    unsigned char *in;
    uint64_t unacked;  /* DATA bytes received since the last WINDOW_UPDATE */
};

static size_t h2_frame(unsigned char *out, uint32_t len, uint8_t type, uint8_t flags, uint32_t sid) {
    out[0] = (unsigned char)(len >> 16); out[1] = (unsigned char)(len >> 8); out[2] = (unsigned char)len;
    out[3] = type; out[4] = flags;
    out[5] = (unsigned char)((sid >> 24) & 0x7f); out[6] = (unsigned char)(sid >> 16);
    out[7] = (unsigned char)(sid >> 8); out[8] = (unsigned char)sid;
    return 9;
}

/* HEADERS :status 200, content-type: application/grpc; DATA one gRPC message;
 * HEADERS grpc-status: 0 with END_STREAM. HPACK: static index 8 (":status 200"),
 * literal without indexing with static name 31 (content-type), literal with a
 * new name for grpc-status; no Huffman, no dynamic table. */
static size_t grpc_response(unsigned char *out, uint32_t sid) {
    static const char ct[] = "application/grpc";
    static const char msg[] = "\x0a\x24" "5c1b0000-6761-7465-8000-000000000011";  /* ConfigResponse.session_id */
    size_t n = 0, hl = 0;
    unsigned char h[64];
    h[hl++] = 0x88;
    h[hl++] = 0x0f; h[hl++] = 31 - 15;
    h[hl++] = (unsigned char)(sizeof ct - 1); memcpy(h + hl, ct, sizeof ct - 1); hl += sizeof ct - 1;
    n += h2_frame(out + n, (uint32_t)hl, 0x1, 0x4, sid);
    memcpy(out + n, h, hl); n += hl;
    uint32_t ml = sizeof msg - 1;
    n += h2_frame(out + n, 5 + ml, 0x0, 0x0, sid);
    out[n++] = 0; out[n++] = 0; out[n++] = 0; out[n++] = 0; out[n++] = (unsigned char)ml;
    memcpy(out + n, msg, ml); n += ml;
    unsigned char t[32];
    size_t tl = 0;
    t[tl++] = 0x00; t[tl++] = 11; memcpy(t + tl, "grpc-status", 11); tl += 11;
    t[tl++] = 1; t[tl++] = '0';
    n += h2_frame(out + n, (uint32_t)tl, 0x1, 0x5, sid);
    memcpy(out + n, t, tl); n += tl;
    return n;
}

/* Consume complete frames of c->in; append replies to out. -1: close. */
static int h2_process(struct h2conn *c, unsigned char *out, size_t *outlen, size_t outcap) {
    size_t off = 0;
    if (!c->preface_done) {
        if (c->len < H2_PREFACE_LEN) return 0;
        if (memcmp(c->in, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2_PREFACE_LEN) != 0) return -1;
        off = H2_PREFACE_LEN;
        c->preface_done = 1;
        /* our SETTINGS: MAX_CONCURRENT_STREAMS 1000; then a large connection window */
        unsigned char *o = out + *outlen;
        size_t n = h2_frame(o, 6, 0x4, 0, 0);
        o[n++] = 0; o[n++] = 3; o[n++] = 0; o[n++] = 0; o[n++] = 0x03; o[n++] = 0xe8;
        n += h2_frame(o + n, 4, 0x8, 0, 0);
        o[n++] = 0x3f; o[n++] = 0xff; o[n++] = 0x00; o[n++] = 0x00;
        *outlen += n;
    }
    while (c->len - off >= 9 && outcap - *outlen > 512) {
        unsigned char *f = c->in + off;
        uint32_t len = ((uint32_t)f[0] << 16) | ((uint32_t)f[1] << 8) | f[2];
        uint8_t type = f[3], flags = f[4];
        uint32_t sid = (((uint32_t)f[5] & 0x7f) << 24) | ((uint32_t)f[6] << 16) | ((uint32_t)f[7] << 8) | f[8];
        if (len > GRPC_MAX_IN / 2) return -1;
        if (c->len - off < 9 + (size_t)len) break;
        unsigned char *o = out + *outlen;
        if (type == 0x0) {                         /* DATA */
            c->unacked += len;
            if (flags & 0x1) *outlen += grpc_response(o, sid);
        } else if (type == 0x1) {                  /* HEADERS */
            if (flags & 0x1) *outlen += grpc_response(o, sid);
        } else if (type == 0x4 && !(flags & 0x1)) { /* SETTINGS -> ACK */
            *outlen += h2_frame(o, 0, 0x4, 0x1, 0);
        } else if (type == 0x6 && !(flags & 0x1) && len == 8) { /* PING -> ACK */
            size_t n = h2_frame(o, 8, 0x6, 0x1, 0);
            memcpy(o + n, f + 9, 8);
            *outlen += n + 8;
        } else if (type == 0x7) {                  /* GOAWAY */
            return -1;
        }
        off += 9 + len;
    }
    if (c->unacked >= 32768) {                 /* replenish the connection window */
        unsigned char *o = out + *outlen;
        size_t n = h2_frame(o, 4, 0x8, 0, 0);
        uint32_t inc = (uint32_t)c->unacked;
        o[n++] = (unsigned char)(inc >> 24); o[n++] = (unsigned char)(inc >> 16);
        o[n++] = (unsigned char)(inc >> 8); o[n++] = (unsigned char)inc;
        *outlen += n;
        c->unacked = 0;
    }
    memmove(c->in, c->in + off, c->len - off);
    c->len -= off;
    return 0;
}

static int cmd_grpc(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: benchtool grpc MAX_SECONDS PORT...\n");
        return 2;
    }
    double deadline = now_s() + atof(argv[0]);
    static unsigned char is_listener[FD_LIMIT];
    static struct h2conn *conns[FD_LIMIT];
    static unsigned char out[1 << 18];
    int ep = listen_all(argc, argv, is_listener);
    struct epoll_event evs[256];
    while (now_s() < deadline) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (is_listener[fd]) {
                for (int k = 0; k < 1024; k++) {
                    int c = accept_client(fd);
                    if (c < 0) break;
                    struct h2conn *hc = calloc(1, sizeof *hc);
                    if (!hc) { close(c); continue; }
                    hc->fd = c;
                    hc->cap = 65536;
                    hc->in = malloc(hc->cap);
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c};
                    if (!hc->in || epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) < 0) {
                        free(hc->in); free(hc); close(c);
                        continue;
                    }
                    conns[c] = hc;
                }
                continue;
            }
            struct h2conn *hc = conns[fd];
            int bad = hc == NULL;
            for (int rounds = 0; !bad && rounds < 64; rounds++) {  /* bounded drain */
                if (hc->len == hc->cap) {
                    if (hc->cap >= GRPC_MAX_IN) { bad = 1; break; }
                    unsigned char *bigger = realloc(hc->in, hc->cap * 2);
                    if (!bigger) { bad = 1; break; }
                    hc->in = bigger;
                    hc->cap *= 2;
                }
                ssize_t r = read(fd, hc->in + hc->len, hc->cap - hc->len);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { bad = 1; break; }
                if (r < 0) break;
                hc->len += (size_t)r;
                size_t outlen = 0;
                do {
                    size_t before = hc->len;
                    if (h2_process(hc, out, &outlen, sizeof out) < 0) { bad = 1; break; }
                    if (outlen && write_all(fd, (char *)out, outlen) < 0) { bad = 1; break; }
                    if (hc->len == before || outlen == 0) break;
                    outlen = 0;
                } while (1);
            }
            if (bad) {
                if (hc) { free(hc->in); free(hc); conns[fd] = NULL; }
                close(fd);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------- idle-conn client */

struct idle_client {
    struct sockaddr_in sa;
    int ep;
    int *fds;
    int n_open;     /* established connections: fds[0..n_open) */
    int max_conns;
};

static int idle_open(struct idle_client *ic, int target, char *err, size_t errlen) {
    double deadline = now_s() + CMD_TIMEOUT_S;
    int pending = 0;
    struct epoll_event evs[MAX_PENDING_CONNECTS];
    if (target > ic->max_conns) target = ic->max_conns;
    while (ic->n_open < target) {
        while (pending < MAX_PENDING_CONNECTS && ic->n_open + pending < target) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0) { snprintf(err, errlen, "socket: %s", strerror(errno)); return -1; }
            if (connect(fd, (struct sockaddr *)&ic->sa, sizeof ic->sa) < 0 && errno != EINPROGRESS) {
                snprintf(err, errlen, "connect: %s", strerror(errno));
                close(fd);
                return -1;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
            if (epoll_ctl(ic->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
                snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
                return -1;
            }
            pending++;
        }
        if (now_s() > deadline) { snprintf(err, errlen, "timeout opening connections"); return -1; }
        int n = epoll_wait(ic->ep, evs, MAX_PENDING_CONNECTS, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd, soerr = 0;
            socklen_t sl = sizeof soerr;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            epoll_ctl(ic->ep, EPOLL_CTL_DEL, fd, NULL);
            pending--;
            if (soerr != 0) {
                snprintf(err, errlen, "connect: %s", strerror(soerr));
                close(fd);
                return -1;
            }
            ic->fds[ic->n_open++] = fd;
        }
    }
    return 0;
}

static int idle_ping(struct idle_client *ic, int count, char *err, size_t errlen) {
    double deadline = now_s() + CMD_TIMEOUT_S;
    int waiting = 0;
    struct epoll_event evs[256];
    if (count > ic->n_open) count = ic->n_open;
    for (int i = 0; i < count; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = ic->fds[i]};
        if (write(ic->fds[i], "p", 1) != 1) { snprintf(err, errlen, "write: %s", strerror(errno)); return -1; }
        if (epoll_ctl(ic->ep, EPOLL_CTL_ADD, ic->fds[i], &ev) < 0) { snprintf(err, errlen, "epoll_ctl: %s", strerror(errno)); return -1; }
        waiting++;
    }
    while (waiting > 0) {
        if (now_s() > deadline) { snprintf(err, errlen, "timeout waiting for echoes (%d missing)", waiting); return -1; }
        int n = epoll_wait(ic->ep, evs, 256, 1000);
        for (int i = 0; i < n; i++) {
            char c;
            int fd = evs[i].data.fd;
            ssize_t r = read(fd, &c, 1);
            if (r == 1) {
                epoll_ctl(ic->ep, EPOLL_CTL_DEL, fd, NULL);
                waiting--;
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                snprintf(err, errlen, "connection closed by peer during ping");
                return -1;
            }
        }
    }
    return 0;
}

static int cmd_idle(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: benchtool idle HOST PORT MAX_CONNS\n");
        return 2;
    }
    struct idle_client ic = {.sa = make_addr(argv[0], atoi(argv[1])), .max_conns = atoi(argv[2])};
    char line[256], err[256];
    raise_nofile();
    if (ic.max_conns <= 0 || ic.max_conns > 60000) { fprintf(stderr, "bad MAX_CONNS\n"); return 2; }
    ic.fds = calloc((size_t)ic.max_conns, sizeof(int));
    ic.ep = epoll_create1(0);
    if (!ic.fds || ic.ep < 0) die("init");
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        int arg = 0, rc;
        err[0] = 0;
        if (sscanf(line, "open %d", &arg) == 1) {
            rc = idle_open(&ic, arg, err, sizeof err);
        } else if (sscanf(line, "ping %d", &arg) == 1) {
            rc = idle_ping(&ic, arg, err, sizeof err);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            rc = -1;
            snprintf(err, sizeof err, "unknown command");
        }
        if (rc == 0) printf("ok %d\n", ic.n_open);
        else printf("fail %s\n", err);
    }
    /* RST instead of FIN: leaves no TIME_WAIT behind for the next variant */
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < ic.n_open; i++) {
        setsockopt(ic.fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(ic.fds[i]);
    }
    return 0;
}

/* ------------------------------------------------------------- ping-pong */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const int64_t *sorted, long n, double p) {
    long idx = (long)(p / 100.0 * (double)n + 0.5) - 1; /* nearest rank */
    if (idx < 0) idx = 0;
    if (idx >= n) idx = n - 1;
    return sorted[idx] / 1000.0;
}

static int roundtrip(int fd, char *buf, int size) {
    if (write_all(fd, buf, (size_t)size) < 0) return -1;
    int got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, (size_t)(size - got));
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return -1;
        }
        got += (int)r;
    }
    return 0;
}

static int cmd_pingpong(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: benchtool pingpong HOST PORT SECONDS SIZE MAX_COUNT WARMUP\n");
        return 2;
    }
    struct sockaddr_in sa = make_addr(argv[0], atoi(argv[1]));
    double seconds = atof(argv[2]);
    int size = atoi(argv[3]);
    long max_count = atol(argv[4]), warmup = atol(argv[5]);
    if (size <= 0 || size > 65536 || max_count <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
    char *buf = malloc((size_t)size);
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)max_count);
    if (!buf || !lat) die("malloc");
    memset(buf, 'x', (size_t)size);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    set_nodelay(fd);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (long i = 0; i < warmup; i++)
        if (roundtrip(fd, buf, size) < 0) die("warm-up round trip");
    long n = 0;
    int64_t start = now_ns(), end_at = start + (int64_t)(seconds * 1e9), t0 = start, t1 = start;
    while (n < max_count && t0 < end_at) {
        if (roundtrip(fd, buf, size) < 0) die("round trip");
        t1 = now_ns();
        lat[n++] = t1 - t0;
        t0 = t1;
    }
    close(fd);
    double elapsed = (t1 - start) / 1e9;
    qsort(lat, (size_t)n, sizeof(int64_t), cmp_i64);
    printf("{\"count\": %ld, \"seconds\": %.6f, \"rps\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
           n, elapsed, n / elapsed, pct_us(lat, n, 50), pct_us(lat, n, 90), pct_us(lat, n, 99),
           pct_us(lat, n, 99.9), lat[n - 1] / 1000.0);
    return 0;
}

/* ------------------------------------------- many-source connection client */

/* The JSON line of the conns and grpccalls clients; sorts lat. Exit status: 1 if nothing got
 * through. */
static int print_load_result(int64_t *lat, long done, long unfinished, long errors, double elapsed) {
    if (done == 0) {
        printf("{\"count\": 0, \"errors\": %ld, \"unfinished\": %ld, \"seconds\": %.3f}\n", errors,
               unfinished, elapsed);
        return 1;
    }
    qsort(lat, (size_t)done, sizeof(int64_t), cmp_i64);
    printf("{\"count\": %ld, \"errors\": %ld, \"unfinished\": %ld, \"seconds\": %.3f, \"per_s\": %.1f, "
           "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
           done, errors, unfinished, elapsed, done / elapsed, pct_us(lat, done, 50), pct_us(lat, done, 90),
           pct_us(lat, done, 99), pct_us(lat, done, 99.9), lat[done - 1] / 1000.0);
    return 0;
}

#define CONNS_MAX_COUNT 20000000L
#define CONNS_FIRST_ADDR 0x7F010000u /* 127.1.0.0: address number 0 */
#define CONNS_MAX_ADDRS (0x7FFFFFFEu - CONNS_FIRST_ADDR)

struct conn_slot {
    int fd;
    int state; /* 0 free, 1 connecting, 2 waiting for the echo, 3 waiting for EOF */
    int64_t t0;
};

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* Starts a non-blocking connection from source address number k; returns the fd or -1. */
static int conns_start(const struct sockaddr_in *dst, uint32_t k) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    /* the port is picked at connect() time, knowing the destination (no bind-time clashes) */
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in src;
    memset(&src, 0, sizeof src);
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(CONNS_FIRST_ADDR + k);
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0 ||
        (connect(fd, (const struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS)) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmd_conns(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: benchtool conns HOST PORT COUNT CONCURRENCY BASE RANGE seq|rand MAX_SECONDS\n");
        return 2;
    }
    struct sockaddr_in dst = make_addr(argv[0], atoi(argv[1]));
    long count = atol(argv[2]), conc = atol(argv[3]);
    uint32_t base = (uint32_t)atol(argv[4]), range = (uint32_t)atol(argv[5]);
    int random_order = strcmp(argv[6], "rand") == 0;
    double deadline = now_s() + atof(argv[7]);
    if (count <= 0 || count > CONNS_MAX_COUNT || conc <= 0 || conc > 1024 || (random_order && range == 0) ||
        (uint64_t)base + (random_order ? range : (uint64_t)count) > CONNS_MAX_ADDRS ||
        (!random_order && strcmp(argv[6], "seq") != 0)) {
        fprintf(stderr, "benchtool conns: bad arguments\n");
        return 2;
    }
    raise_nofile();
    rng_state ^= (uint64_t)now_ns();
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)count);
    struct conn_slot *slots = calloc((size_t)conc, sizeof *slots);
    if (!lat || !slots) die("malloc");
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    long started = 0, done = 0, errors = 0, active = 0;
    int64_t t_start = now_ns();
    char byte = 'x', buf[64];
    struct epoll_event evs[256];
    while ((started < count || active > 0) && now_s() < deadline) {
        for (long i = 0; i < conc && started < count; i++) {
            if (slots[i].state != 0) continue;
            uint32_t k = base + (random_order ? (uint32_t)(rng_next() % range) : (uint32_t)started);
            started++;
            int fd = conns_start(&dst, k);
            if (fd < 0) { errors++; continue; }
            slots[i] = (struct conn_slot){.fd = fd, .state = 1, .t0 = now_ns()};
            struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
            active++;
        }
        int n = epoll_wait(ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            struct conn_slot *c = &slots[evs[e].data.u64];
            int fail = (evs[e].events & EPOLLERR) != 0, finished = 0;
            if (!fail && c->state == 1) {
                struct epoll_event ev = {.events = EPOLLIN, .data.u64 = evs[e].data.u64};
                fail = write(c->fd, &byte, 1) != 1 || epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0;
                c->state = 2;
            } else if (!fail) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (c->state == 2) {
                    if (r <= 0) {
                        fail = 1;
                    } else {
                        lat[done++] = now_ns() - c->t0;
                        c->state = 3;
                    }
                } else {
                    finished = 1; /* EOF (or a reset) after the echo */
                }
            }
            if (fail || finished) {
                errors += fail;
                close(c->fd);
                c->state = 0;
                active--;
            }
        }
    }
    double elapsed = (now_ns() - t_start) / 1e9;
    return print_load_result(lat, done, count - done - errors, errors, elapsed);
}

/* -------------------------------------------------------- gRPC call client */

#define CALLS_MAX_COUNT 10000000L
#define CALLS_MAX_INFLIGHT 256
#define SID_OFFSET 7   /* 5-byte gRPC prefix, tag 0x0a, length 0x24: then the UUID */
#define SID_LEN 36

struct call_slot { uint32_t sid; int64_t t0; int got_data; };

static size_t hpack_literal(unsigned char *o, uint8_t first, const char *name, const char *value) {
    size_t n = 0, vl = strlen(value);
    o[n++] = first; /* literal without indexing: an indexed name (first = index < 15) or 0 + a new name */
    if (name) { size_t nl = strlen(name); o[n++] = (unsigned char)nl; memcpy(o + n, name, nl); n += nl; }
    o[n++] = (unsigned char)vl;
    memcpy(o + n, value, vl);
    return n + vl;
}

/* Reads BODY_FILE, a gRPC-framed Spark request whose session id (a UUID) sits at byte
 * SID_OFFSET; its length, or 0 (with a message) when it is not one. */
static size_t spark_body(const char *path, unsigned char *body, size_t cap) {
    FILE *bf = fopen(path, "rb");
    if (!bf) die("open BODY_FILE");
    size_t len = fread(body, 1, cap, bf);
    fclose(bf);
    if (len < SID_OFFSET + SID_LEN || len == cap || body[5] != 0x0a || body[6] != SID_LEN) {
        fprintf(stderr, "benchtool: BODY_FILE is not a gRPC message starting with a session id\n");
        return 0;
    }
    return len;
}

/* The header block of a unary Config call, the same for every call: literals without
 * indexing only, so the server's HPACK decoder needs no state of ours. Returns its length. */
static size_t config_call_headers(unsigned char *hdr, const char *authority) {
    size_t hl = 0;
    hdr[hl++] = 0x83; /* :method POST */
    hdr[hl++] = 0x86; /* :scheme http */
    hl += hpack_literal(hdr + hl, 0x04, NULL, "/spark.connect.SparkConnectService/Config");
    hl += hpack_literal(hdr + hl, 0x01, NULL, authority);
    hdr[hl++] = 0x0f; /* content-type: static index 31 = 15 + 16 */
    hl += hpack_literal(hdr + hl, 16, NULL, "application/grpc");
    hl += hpack_literal(hdr + hl, 0x00, "te", "trailers");
    return hl;
}

/* A client's first bytes: the preface, SETTINGS (defaults), the connection window + 1 GiB. */
static size_t client_preface(unsigned char *out) {
    size_t n = H2_PREFACE_LEN;
    memcpy(out, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2_PREFACE_LEN);
    n += h2_frame(out + n, 0, 0x4, 0, 0);
    n += h2_frame(out + n, 4, 0x8, 0, 0);
    out[n++] = 0x40; out[n++] = 0; out[n++] = 0; out[n++] = 0;
    return n;
}

static int cmd_grpccalls(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: benchtool grpccalls HOST PORT BODY_FILE COUNT IN_FLIGHT BASE MAX_SECONDS\n");
        return 2;
    }
    struct sockaddr_in sa = make_addr(argv[0], atoi(argv[1]));
    long count = atol(argv[3]), inflight_max = atol(argv[4]);
    unsigned long long base = strtoull(argv[5], NULL, 10);
    double deadline = now_s() + atof(argv[6]);
    if (count <= 0 || count > CALLS_MAX_COUNT || inflight_max <= 0 || inflight_max > CALLS_MAX_INFLIGHT ||
        base + (unsigned long long)count > 0xFFFFFFFFFFFFull) {
        fprintf(stderr, "benchtool grpccalls: bad arguments\n");
        return 2;
    }
    unsigned char body[4096], hdr[256];
    size_t body_len = spark_body(argv[2], body, sizeof body);
    if (body_len == 0) return 2;
    size_t hl = config_call_headers(hdr, argv[0]);

    int64_t *lat = malloc(sizeof(int64_t) * (size_t)count);
    struct call_slot *slots = calloc(CALLS_MAX_INFLIGHT, sizeof *slots);
    size_t incap = 1 << 20, inlen = 0;
    unsigned char *in = malloc(incap), *out = malloc(1 << 16);
    if (!lat || !slots || !in || !out) die("malloc");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    set_nodelay(fd);
    size_t n = client_preface(out);
    if (write_all(fd, (char *)out, n) < 0) die("write preface");
    set_nonblock(fd);

    long started = 0, done = 0, errors = 0, inflight = 0;
    uint64_t unacked = 0;
    uint32_t next_sid = 1;
    int64_t t_start = now_ns();
    char hex[16];
    while ((started < count || inflight > 0) && now_s() < deadline) {
        n = 0;
        while (started < count && inflight < inflight_max && n < (1 << 16) - 4096) {
            struct call_slot *c = NULL;
            for (int i = 0; i < CALLS_MAX_INFLIGHT; i++) if (slots[i].sid == 0) { c = &slots[i]; break; }
            snprintf(hex, sizeof hex, "%012llx", base + (unsigned long long)started);
            memcpy(body + SID_OFFSET + SID_LEN - 12, hex, 12);
            *c = (struct call_slot){.sid = next_sid, .t0 = now_ns()};
            n += h2_frame(out + n, (uint32_t)hl, 0x1, 0x4, next_sid);
            memcpy(out + n, hdr, hl); n += hl;
            n += h2_frame(out + n, (uint32_t)body_len, 0x0, 0x1, next_sid);
            memcpy(out + n, body, body_len); n += body_len;
            next_sid += 2;
            started++;
            inflight++;
        }
        if (unacked >= 32768) {
            n += h2_frame(out + n, 4, 0x8, 0, 0);
            out[n++] = (unsigned char)(unacked >> 24); out[n++] = (unsigned char)(unacked >> 16);
            out[n++] = (unsigned char)(unacked >> 8); out[n++] = (unsigned char)unacked;
            unacked = 0;
        }
        if (n && write_all(fd, (char *)out, n) < 0) die("write");
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0) continue;
        ssize_t r = read(fd, in + inlen, incap - inlen);
        if (r == 0) { fprintf(stderr, "benchtool grpccalls: the server closed the connection\n"); break; }
        if (r < 0) { if (errno == EAGAIN || errno == EINTR) continue; die("read"); }
        inlen += (size_t)r;
        size_t off = 0;
        n = 0;
        while (inlen - off >= 9) {
            unsigned char *f = in + off;
            uint32_t len = ((uint32_t)f[0] << 16) | ((uint32_t)f[1] << 8) | f[2];
            uint8_t type = f[3], flags = f[4];
            uint32_t sid = (((uint32_t)f[5] & 0x7f) << 24) | ((uint32_t)f[6] << 16) | ((uint32_t)f[7] << 8) | f[8];
            if (len > incap / 2) { fprintf(stderr, "benchtool grpccalls: frame too large\n"); return 1; }
            if (inlen - off < 9 + (size_t)len) break;
            struct call_slot *c = NULL;
            if (sid) for (int i = 0; i < CALLS_MAX_INFLIGHT; i++) if (slots[i].sid == sid) { c = &slots[i]; break; }
            if (type == 0x0) { unacked += len; if (c) c->got_data = 1; }
            if (c && ((type <= 0x1 && (flags & 0x1)) || type == 0x3)) { /* END_STREAM or RST_STREAM */
                if (type != 0x3 && c->got_data) lat[done++] = now_ns() - c->t0;
                else errors++;
                c->sid = 0;
                inflight--;
            } else if (type == 0x4 && !(flags & 0x1)) {
                n += h2_frame(out + n, 0, 0x4, 0x1, 0);
            } else if (type == 0x6 && !(flags & 0x1) && len == 8) {
                n += h2_frame(out + n, 8, 0x6, 0x1, 0);
                memcpy(out + n, f + 9, 8); n += 8;
            } else if (type == 0x7) {
                fprintf(stderr, "benchtool grpccalls: GOAWAY from the server\n");
                started = count; /* stop sending; what is in flight is lost */
                errors += inflight; inflight = 0;
            }
            off += 9 + len;
        }
        memmove(in, in + off, inlen - off);
        inlen -= off;
        if (n && write_all(fd, (char *)out, n) < 0) die("write");
    }
    close(fd);
    double elapsed = (now_ns() - t_start) / 1e9;
    return print_load_result(lat, done, count - done - errors, errors, elapsed);
}

/* ------------------------------------------ concurrent Spark sessions client */

#define CONC_MAX_CONNS 60000L
#define CONC_MAX_OPEN_S 300.0
#define CONC_DRAIN_S 10.0
#define CONC_IN_MAX (1 << 20)
#define CONC_MAX_LAT (1L << 27)

enum { GC_CONNECTING = 1, GC_OPENING, GC_OPEN, GC_DEAD };

/* One client connection = one Spark session, as PySpark keeps one channel per session. */
struct gconn {
    int fd, state;
    int busy;                /* a call is in flight on stream `sid` */
    uint32_t sid, next_sid;
    int64_t t_due;           /* when the call in flight was due: its latency counts from here */
    int status_200, got_data, grpc_status; /* of the call in flight; grpc_status -1: none seen */
    uint32_t hdr_sid;        /* a header block continues (CONTINUATION) on this stream; 0: none */
    int hdr_end_stream;
    long k_sent;             /* calls sent in the current phase */
    uint32_t unacked;        /* DATA bytes received since our last WINDOW_UPDATE */
    size_t inlen, incap;
    unsigned char *in;
    nghttp2_hd_inflater *hd; /* the server's header compression state (HPACK, Huffman) */
    char session[12];        /* the last 12 hex digits of this connection's session id */
};

/* A measured phase: paced (a total rate over all connections, each due call sent on its
 * connection when that one has no call in flight, its latency counted from when it was due)
 * or closed loop (rate 0: each connection sends its next call when the last one returns). */
struct phase {
    const char *name;
    double rate;
    int64_t t0, w0, w1;      /* start, window start, window end (ns) */
    long next_j;             /* paced: the next call number in the schedule */
    int64_t *lat;            /* latencies of the calls that completed OK inside the window */
    long done, cap;
    long errors, lost, unfinished, behind;
    long pings;              /* PINGs the server sent in the window (each one a round trip) */
};

struct conc {
    struct gconn *c;
    long n;
    int ep;
    unsigned char body[4096], hdr[256];
    size_t body_len, hdr_len;
    struct phase *ph;        /* NULL while the connections open */
    long open_ok, open_failed, inflight;
};

static void gc_close(struct conc *g, struct gconn *c) {
    if (c->busy) g->inflight--;
    c->busy = 0;
    c->state = GC_DEAD;
    close(c->fd); /* also leaves the epoll set */
    free(c->in);
    c->in = NULL;
    if (c->hd) nghttp2_hd_inflate_del(c->hd);
    c->hd = NULL;
}

/* The connection broke (reset, EOF, GOAWAY, a protocol error, a stalled write). */
static void gc_lost(struct conc *g, struct gconn *c) {
    if (c->state == GC_DEAD) return;
    if (c->state == GC_OPEN && g->ph) {
        g->ph->lost++;
        g->ph->errors += c->busy;
    } else {
        g->open_failed++;
    }
    gc_close(g, c);
}

/* Small writes (one call, or a control frame) on a connection with at most one call in
 * flight: a short write means the peer stopped reading, and the connection counts as lost. */
static int gc_write(struct conc *g, struct gconn *c, const unsigned char *buf, size_t n) {
    if (write(c->fd, buf, n) == (ssize_t)n) return 0;
    gc_lost(g, c);
    return -1;
}

static void gc_send(struct conc *g, struct gconn *c, int64_t t_due) {
    unsigned char out[4608];
    size_t n = 0;
    c->sid = c->next_sid;
    c->next_sid += 2;
    memcpy(g->body + SID_OFFSET + SID_LEN - 12, c->session, 12);
    n += h2_frame(out + n, (uint32_t)g->hdr_len, 0x1, 0x4, c->sid);
    memcpy(out + n, g->hdr, g->hdr_len); n += g->hdr_len;
    n += h2_frame(out + n, (uint32_t)g->body_len, 0x0, 0x1, c->sid);
    memcpy(out + n, g->body, g->body_len); n += g->body_len;
    if (c->unacked >= 32768) { /* replenish the connection window */
        n += h2_frame(out + n, 4, 0x8, 0, 0);
        out[n++] = (unsigned char)(c->unacked >> 24); out[n++] = (unsigned char)(c->unacked >> 16);
        out[n++] = (unsigned char)(c->unacked >> 8); out[n++] = (unsigned char)c->unacked;
        c->unacked = 0;
    }
    c->busy = 1;
    c->t_due = t_due;
    c->status_200 = c->got_data = 0;
    c->grpc_status = -1;
    c->k_sent++;
    g->inflight++;
    gc_write(g, c, out, n);
}

/* Sends the connection's next call if the phase wants one now. */
static void gc_next(struct conc *g, struct gconn *c, int64_t now) {
    struct phase *p = g->ph;
    if (!p || c->state != GC_OPEN || c->busy || now >= p->w1) return;
    if (p->rate <= 0) {
        gc_send(g, c, now);
        return;
    }
    long idx = (long)(c - g->c);
    int64_t due = p->t0 + (int64_t)((double)(c->k_sent * g->n + idx) * 1e9 / p->rate);
    if (due <= now) gc_send(g, c, due); /* behind its schedule: catch up */
}

static void gc_done(struct conc *g, struct gconn *c, int ok) {
    int64_t now = now_ns();
    c->busy = 0;
    g->inflight--;
    if (c->state == GC_OPENING) { /* the session's first call */
        if (!ok) {
            gc_lost(g, c);
            return;
        }
        c->state = GC_OPEN;
        g->open_ok++;
        return;
    }
    struct phase *p = g->ph;
    if (!p) return;
    if (!ok) {
        p->errors++;
    } else if (now >= p->w0 && now < p->w1) {
        if (p->done == p->cap) {
            if (p->cap >= CONC_MAX_LAT) die("too many calls to record");
            p->cap = p->cap ? p->cap * 2 : 65536;
            p->lat = realloc(p->lat, sizeof(int64_t) * (size_t)p->cap);
            if (!p->lat) die("realloc");
        }
        p->lat[p->done++] = now - c->t_due;
    }
    gc_next(g, c, now);
}

static int gc_ok(const struct gconn *c) { return c->status_200 && c->got_data && c->grpc_status == 0; }

/* Decodes a header block fragment (keeping the HPACK state in step for every stream); for
 * the call in flight, notes :status and grpc-status. -1: a compression error. */
static int gc_inflate(struct gconn *c, const unsigned char *in, size_t len, int final) {
    int mine = c->busy && c->hdr_sid == c->sid;
    for (;;) {
        nghttp2_nv nv;
        int fl = 0;
        ssize_t r = nghttp2_hd_inflate_hd2(c->hd, &nv, &fl, in, len, final);
        if (r < 0) return -1;
        in += r;
        len -= (size_t)r;
        if ((fl & NGHTTP2_HD_INFLATE_EMIT) && mine) {
            if (nv.namelen == 7 && memcmp(nv.name, ":status", 7) == 0) {
                c->status_200 = nv.valuelen == 3 && memcmp(nv.value, "200", 3) == 0;
            } else if (nv.namelen == 11 && memcmp(nv.name, "grpc-status", 11) == 0) {
                int v = 0;
                for (size_t i = 0; i < nv.valuelen && i < 4; i++)
                    v = nv.value[i] >= '0' && nv.value[i] <= '9' ? v * 10 + (nv.value[i] - '0') : 999;
                c->grpc_status = nv.valuelen ? v : 999;
            }
        }
        if (fl & NGHTTP2_HD_INFLATE_FINAL) {
            nghttp2_hd_inflate_end_headers(c->hd);
            return 0;
        }
        if (!(fl & NGHTTP2_HD_INFLATE_EMIT) && len == 0) return 0;
    }
}

/* Consumes the complete frames in c->in. The connection may be lost (closed, c->in freed)
 * on the way: every step checks. */
static void gc_frames(struct conc *g, struct gconn *c) {
    size_t off = 0;
    while (c->state != GC_DEAD && c->inlen - off >= 9) {
        unsigned char *f = c->in + off, ctl[32];
        uint32_t len = ((uint32_t)f[0] << 16) | ((uint32_t)f[1] << 8) | f[2];
        uint8_t type = f[3], flags = f[4];
        uint32_t sid = (((uint32_t)f[5] & 0x7f) << 24) | ((uint32_t)f[6] << 16) | ((uint32_t)f[7] << 8) | f[8];
        if (len > CONC_IN_MAX / 2) { gc_lost(g, c); return; }
        if (c->inlen - off < 9 + (size_t)len) break;
        off += 9 + len;
        unsigned char *pl = f + 9;
        int mine = c->busy && sid == c->sid;
        if (type == 0x0) {                                   /* DATA */
            c->unacked += len;
            if (mine) c->got_data = 1;
            if (mine && (flags & 0x1)) gc_done(g, c, gc_ok(c));
        } else if (type == 0x1 || type == 0x9) {             /* HEADERS, CONTINUATION */
            size_t plen = len;
            if (type == 0x1) {
                size_t pad = 0;
                if (flags & 0x8) { pad = plen ? pl[0] : 0; pl++; plen = plen ? plen - 1 : 0; }
                if (flags & 0x20) { pl += 5; plen = plen >= 5 ? plen - 5 : 0; }
                if (pad > plen) { gc_lost(g, c); return; }
                plen -= pad;
                c->hdr_sid = sid;
                c->hdr_end_stream = flags & 0x1;
            } else if (sid != c->hdr_sid) {
                gc_lost(g, c);
                return;
            }
            if (gc_inflate(c, pl, plen, flags & 0x4) < 0) { gc_lost(g, c); return; }
            if (flags & 0x4) {
                int ends = c->hdr_end_stream && c->busy && c->hdr_sid == c->sid;
                c->hdr_sid = 0;
                if (ends) gc_done(g, c, gc_ok(c));
            }
        } else if (type == 0x3) {                            /* RST_STREAM */
            if (mine) gc_done(g, c, 0);
        } else if (type == 0x4 && !(flags & 0x1)) {          /* SETTINGS -> ACK */
            gc_write(g, c, ctl, h2_frame(ctl, 0, 0x4, 0x1, 0));
        } else if (type == 0x6 && !(flags & 0x1) && len == 8) { /* PING -> ACK */
            int64_t now = now_ns();
            if (g->ph && now >= g->ph->w0 && now < g->ph->w1) g->ph->pings++;
            size_t n = h2_frame(ctl, 8, 0x6, 0x1, 0);
            memcpy(ctl + n, pl, 8);
            gc_write(g, c, ctl, n + 8);
        } else if (type == 0x7) {                            /* GOAWAY */
            gc_lost(g, c);
            return;
        }
    }
    if (c->state == GC_DEAD) return;
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
}

/* The connect finished: the preface and the session's first call. */
static void gc_connected(struct conc *g, struct gconn *c) {
    int err = 0;
    socklen_t el = sizeof err;
    unsigned char pre[64];
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) { gc_lost(g, c); return; }
    c->incap = 4096;
    c->in = malloc(c->incap);
    if (!c->in || nghttp2_hd_inflate_new(&c->hd) != 0) die("malloc");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(c - g->c)};
    if (epoll_ctl(g->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->state = GC_OPENING;
    if (gc_write(g, c, pre, client_preface(pre)) == 0) gc_send(g, c, now_ns());
}

static void gc_readable(struct conc *g, struct gconn *c) {
    for (int rounds = 0; rounds < 16 && c->state != GC_DEAD; rounds++) {
        if (c->inlen == c->incap) {
            unsigned char *bigger = c->incap < CONC_IN_MAX ? realloc(c->in, c->incap * 2) : NULL;
            if (!bigger) { gc_lost(g, c); return; }
            c->in = bigger;
            c->incap *= 2;
        }
        ssize_t r = read(c->fd, c->in + c->inlen, c->incap - c->inlen);
        if (r > 0) {
            c->inlen += (size_t)r;
            gc_frames(g, c);
        } else if (r < 0 && errno == EAGAIN) {
            return;
        } else if (!(r < 0 && errno == EINTR)) {
            gc_lost(g, c); /* EOF or a reset */
            return;
        }
    }
}

/* Handles what is ready, waiting at most until `until` (ns, and never over 100 ms). */
static void gc_poll(struct conc *g, int64_t until) {
    struct epoll_event evs[256];
    int64_t wait = until - now_ns();
    if (wait < 0) wait = 0;
    if (wait > 100000000) wait = 100000000;
    struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
    int n = epoll_pwait2(g->ep, evs, 256, &ts, NULL);
    if (n < 0 && errno != EINTR) die("epoll_pwait2");
    for (int i = 0; i < n; i++) {
        struct gconn *c = &g->c[evs[i].data.u64];
        if (c->state == GC_CONNECTING) gc_connected(g, c);
        else if (c->state != GC_DEAD) gc_readable(g, c);
    }
}

/* Opens the N connections, at most MAX_PENDING_CONNECTS not yet open at a time, each from
 * its own source address and with its own session, whose first call must answer OK. */
static void gc_open(struct conc *g, const struct sockaddr_in *dst, uint32_t addr_base, double max_s) {
    long started = 0;
    int64_t deadline = now_ns() + (int64_t)(max_s * 1e9);
    while (g->open_ok + g->open_failed < g->n && now_ns() < deadline) {
        while (started < g->n && started - g->open_ok - g->open_failed < MAX_PENDING_CONNECTS) {
            struct gconn *c = &g->c[started];
            c->fd = conns_start(dst, addr_base + (uint32_t)started);
            c->state = GC_CONNECTING;
            struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)started};
            started++;
            if (c->fd < 0) { c->state = GC_DEAD; g->open_failed++; continue; }
            if (epoll_ctl(g->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
        }
        gc_poll(g, deadline);
    }
    for (long i = 0; i < g->n; i++) { /* not open in time */
        struct gconn *c = &g->c[i];
        if (c->state == GC_CONNECTING || c->state == GC_OPENING) {
            gc_lost(g, c);
        } else if (c->state == 0) {
            c->state = GC_DEAD;
            g->open_failed++;
        }
    }
}

static void gc_phase(struct conc *g, struct phase *p, double warm_s, double window_s) {
    p->t0 = now_ns();
    p->w0 = p->t0 + (int64_t)(warm_s * 1e9);
    p->w1 = p->w0 + (int64_t)(window_s * 1e9);
    g->ph = p;
    for (long i = 0; i < g->n; i++) g->c[i].k_sent = 0;
    if (p->rate <= 0)
        for (long i = 0; i < g->n; i++) gc_next(g, &g->c[i], p->t0);
    int in_window = 0;
    for (;;) {
        int64_t now = now_ns();
        if (!in_window && now >= p->w0) {
            printf("window %s start\n", p->name);
            fflush(stdout);
            in_window = 1;
        }
        if (now >= p->w1) break;
        int64_t wake = in_window ? p->w1 : p->w0;
        if (p->rate > 0) {
            long due = (long)((double)(now - p->t0) * p->rate / 1e9) + 1;
            for (; p->next_j < due; p->next_j++) {
                long idx = p->next_j % g->n;
                struct gconn *c = &g->c[idx];
                if (c->state == GC_OPEN && !c->busy && c->k_sent <= p->next_j / g->n)
                    gc_send(g, c, p->t0 + (int64_t)((double)(c->k_sent * g->n + idx) * 1e9 / p->rate));
            }
            int64_t next = p->t0 + (int64_t)((double)p->next_j * 1e9 / p->rate);
            if (next < wake) wake = next;
        }
        gc_poll(g, wake);
    }
    printf("window %s end\n", p->name);
    fflush(stdout);
    if (p->rate > 0) { /* calls due by the window's end that no connection could send */
        double x = (double)(p->w1 - p->t0) * p->rate / 1e9; /* calls due before w1: ceil(x) */
        long due = (long)x + ((double)(long)x < x), sent = 0;
        for (long i = 0; i < g->n; i++) sent += g->c[i].k_sent;
        p->behind = due > sent ? due - sent : 0;
    }
    int64_t drain_end = p->w1 + (int64_t)(CONC_DRAIN_S * 1e9);
    while (g->inflight > 0 && now_ns() < drain_end) gc_poll(g, drain_end);
    for (long i = 0; i < g->n; i++) { /* no answer within the drain: the connection is given up */
        struct gconn *c = &g->c[i];
        if (c->busy) {
            p->unfinished++;
            gc_close(g, c);
        }
    }
}

static void gc_print_phase(struct phase *p, double window_s) {
    printf("\"%s\": {\"offered_per_s\": %.1f, \"count\": %ld, \"per_s\": %.1f, \"errors\": %ld, "
           "\"conns_lost\": %ld, \"unfinished\": %ld, \"behind\": %ld, \"server_pings\": %ld",
           p->name, p->rate, p->done, p->done / window_s, p->errors, p->lost, p->unfinished, p->behind, p->pings);
    if (p->done) {
        qsort(p->lat, (size_t)p->done, sizeof(int64_t), cmp_i64);
        printf(", \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f",
               pct_us(p->lat, p->done, 50), pct_us(p->lat, p->done, 90), pct_us(p->lat, p->done, 99),
               pct_us(p->lat, p->done, 99.9), p->lat[p->done - 1] / 1000.0);
    }
    printf("}");
}

static int cmd_grpcconc(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: benchtool grpcconc HOST PORT BODY_FILE CONNS ADDR_BASE SESSION_BASE RATE "
                        "WARMUP_S WINDOW_S\n");
        return 2;
    }
    static struct conc g;
    struct sockaddr_in dst = make_addr(argv[0], atoi(argv[1]));
    g.n = atol(argv[3]);
    uint32_t addr_base = (uint32_t)atol(argv[4]);
    unsigned long long session_base = strtoull(argv[5], NULL, 10);
    double rate = atof(argv[6]), warm_s = atof(argv[7]), window_s = atof(argv[8]);
    if (g.n <= 0 || g.n > CONC_MAX_CONNS || (uint64_t)addr_base + (uint64_t)g.n > CONNS_MAX_ADDRS ||
        session_base + (unsigned long long)g.n > 0xFFFFFFFFFFFFull || rate < 0 || rate > 1e6 ||
        warm_s < 0 || warm_s > 60 || window_s <= 0 || window_s > 600) {
        fprintf(stderr, "benchtool grpcconc: bad arguments\n");
        return 2;
    }
    raise_nofile();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)g.n + 64) {
        fprintf(stderr, "benchtool grpcconc: the fd limit %lu is too low for %ld connections\n",
                (unsigned long)rl.rlim_cur, g.n);
        return 2;
    }
    g.body_len = spark_body(argv[2], g.body, sizeof g.body);
    if (g.body_len == 0) return 2;
    g.hdr_len = config_call_headers(g.hdr, argv[0]);
    g.c = calloc((size_t)g.n, sizeof *g.c);
    g.ep = epoll_create1(0);
    if (!g.c || g.ep < 0) die("setup");
    char hex[16];
    for (long i = 0; i < g.n; i++) {
        snprintf(hex, sizeof hex, "%012llx", session_base + (unsigned long long)i);
        memcpy(g.c[i].session, hex, 12);
        g.c[i].next_sid = 1;
    }
    int64_t t_open = now_ns();
    gc_open(&g, &dst, addr_base, CONC_MAX_OPEN_S);
    double open_s = (now_ns() - t_open) / 1e9;
    printf("opened %ld of %ld in %.1f s\n", g.open_ok, g.n, open_s);
    fflush(stdout);
    struct phase paced = {.name = "paced", .rate = rate}, closed = {.name = "closed"};
    if (g.open_ok > 0) {
        if (rate > 0) gc_phase(&g, &paced, warm_s, window_s);
        gc_phase(&g, &closed, warm_s, window_s);
    }
    printf("{\"conns\": %ld, \"opened\": %ld, \"open_failed\": %ld, \"open_s\": %.3f, ", g.n, g.open_ok,
           g.open_failed, open_s);
    if (rate > 0) {
        gc_print_phase(&paced, window_s);
        printf(", ");
    }
    gc_print_phase(&closed, window_s);
    printf("}\n");
    return g.open_ok > 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- memcpy */

static double memcpy_gbps(size_t size, double min_seconds) {
    char *src = malloc(size), *dst = malloc(size);
    volatile char sink = 0;
    if (!src || !dst) die("malloc");
    memset(src, 1, size);
    memset(dst, 2, size);
    double t0 = now_s(), t;
    size_t bytes = 0;
    do {
        for (int i = 0; i < 8; i++) {
            memcpy(dst, src, size);
            src[i] ^= dst[size - 1 - i]; /* keep the copies observable */
            bytes += size;
        }
        t = now_s();
    } while (t - t0 < min_seconds);
    sink = dst[size / 2];
    (void)sink;
    free(src);
    free(dst);
    return bytes / (t - t0) / 1e9;
}

static int cmd_memcpy(void) {
    printf("memcpy_64KiB_GBps=%.1f memcpy_256MiB_GBps=%.1f\n",
           memcpy_gbps(64 << 10, 0.2), memcpy_gbps((size_t)256 << 20, 0.3));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "echo") == 0) return cmd_echo(argc - 2, argv + 2, 0);
    if (argc >= 2 && strcmp(argv[1], "echo1") == 0) return cmd_echo(argc - 2, argv + 2, 1);
    if (argc >= 2 && strcmp(argv[1], "conns") == 0) return cmd_conns(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "grpccalls") == 0) return cmd_grpccalls(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "grpcconc") == 0) return cmd_grpcconc(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "idle") == 0) return cmd_idle(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "pingpong") == 0) return cmd_pingpong(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "grpc") == 0) return cmd_grpc(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "memcpy") == 0) return cmd_memcpy();
    fprintf(stderr, "usage: benchtool echo|echo1|conns|idle|pingpong|grpc|grpccalls|grpcconc|memcpy ...\n");
    return 2;
}
