/*
 * The benchmark's TLS client: C on the system OpenSSL, so that the load generator is cheap
 * and identical for every server measured (staple, stdlib ssl, nginx). Built on first use by
 * bench/_client.py (cc -O2 hsclient.c -lssl -lcrypto); bench/_pyclient.py is the fallback.
 *
 *   hsclient hs   HOST PORT PATH SECONDS PROCS [opts]   full handshakes, one GET each
 *   hsclient get  HOST PORT PATH [opts]                 one connection: download PATH
 *   hsclient put  HOST PORT PATH BYTES [opts]           one connection: upload BYTES
 *   opts: -tls1_2 | -tls1_3   -status (send status_request)   -sni NAME
 *         -plain (hs and get only: plain HTTP over TCP, no TLS; the TLS options are ignored)
 *
 * Every mode prints one JSON object on stdout. "hs" forks PROCS processes, each making
 * connections back to back for SECONDS: connect, handshake (a new session every time, no
 * resumption), "GET PATH" with "Connection: close", read to the end, close_notify, close.
 * With -plain: connect, the same GET, read to the end, close.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/tls1.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct opts {
    const char *host, *path, *sni;
    int port, version, status, plain;
};

struct tally {
    long ok, stapled, errors;
    long staple_len;
    double elapsed;
    char cipher[64], version[16];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static SSL_CTX *make_ctx(const struct opts *o) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) return NULL;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    /* Full handshakes only: no session cache, no tickets kept. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (o->version) {
        SSL_CTX_set_min_proto_version(ctx, o->version);
        SSL_CTX_set_max_proto_version(ctx, o->version);
    }
    return ctx;
}

static int tcp_connect(const struct opts *o) {
    struct sockaddr_in addr;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)o->port);
    inet_pton(AF_INET, o->host, &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static SSL *tls_connect(SSL_CTX *ctx, const struct opts *o, int *fd_out) {
    int fd = tcp_connect(o);
    SSL *ssl;
    if (fd < 0) return NULL;
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (o->sni) SSL_set_tlsext_host_name(ssl, o->sni);
    if (o->status) SSL_set_tlsext_status_type(ssl, TLSEXT_STATUSTYPE_ocsp);
    if (SSL_connect(ssl) != 1) {
        if (getenv("HSCLIENT_DEBUG")) ERR_print_errors_fp(stderr);
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    *fd_out = fd;
    return ssl;
}

static int write_all(SSL *ssl, const char *buf, int len) {
    while (len > 0) {
        int n = SSL_write(ssl, buf, len);
        if (n <= 0) return -1;
        buf += n;
        len -= n;
    }
    return 0;
}

/* Read to the end of the stream; returns bytes read, -1 on error. Checks for HTTP 200. */
static long read_all(SSL *ssl, int *http_ok) {
    static char buf[256 * 1024];
    long total = 0;
    for (;;) {
        int n = SSL_read(ssl, buf, sizeof buf);
        if (n <= 0) {
            int err = SSL_get_error(ssl, n);
            if (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL) break;
            return -1;
        }
        if (total == 0 && http_ok) *http_ok = n >= 12 && memcmp(buf, "HTTP/1.1 200", 12) == 0;
        total += n;
    }
    return total;
}

static void finish(SSL *ssl, int fd) {
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
}

/* -plain: one connection without TLS, the same GET, read to the end; bytes read, -1 on error. */
static long plain_get(const struct opts *o, int *http_ok) {
    static char buf[256 * 1024];
    char req[512];
    long total = 0;
    int len, sent = 0, fd = tcp_connect(o);
    if (fd < 0) return -1;
    len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                   o->path, o->sni ? o->sni : o->host);
    while (sent < len) {
        ssize_t n = send(fd, req + sent, (size_t)(len - sent), 0);
        if (n <= 0) {
            close(fd);
            return -1;
        }
        sent += (int)n;
    }
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            close(fd);
            return -1;
        }
        if (n == 0) break;
        if (total == 0) *http_ok = n >= 12 && memcmp(buf, "HTTP/1.1 200", 12) == 0;
        total += n;
    }
    close(fd);
    return total;
}

static int one_request(SSL_CTX *ctx, const struct opts *o, struct tally *t) {
    char req[512];
    int fd, http_ok = 0, len;
    const unsigned char *resp;
    long n;
    SSL *ssl;
    if (o->plain) return plain_get(o, &http_ok) < 0 || !http_ok ? -1 : 0;
    ssl = tls_connect(ctx, o, &fd);
    if (ssl == NULL) return -1;
    len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                   o->path, o->sni ? o->sni : o->host);
    if (write_all(ssl, req, len) != 0 || read_all(ssl, &http_ok) < 0 || !http_ok) {
        finish(ssl, fd);
        return -1;
    }
    n = SSL_get_tlsext_status_ocsp_resp(ssl, &resp);
    if (n > 0) {
        t->stapled++;
        t->staple_len = n;
    }
    if (t->cipher[0] == 0) {
        snprintf(t->cipher, sizeof t->cipher, "%s", SSL_get_cipher_name(ssl));
        snprintf(t->version, sizeof t->version, "%s", SSL_get_version(ssl));
    }
    finish(ssl, fd);
    return 0;
}

static void print_tally(const struct tally *t, double wall) {
    printf("{\"ok\": %ld, \"stapled\": %ld, \"errors\": %ld, \"staple_len\": %ld, "
           "\"elapsed\": %.6f, \"wall\": %.6f, \"cipher\": \"%s\", \"version\": \"%s\"}\n",
           t->ok, t->stapled, t->errors, t->staple_len, t->elapsed, wall, t->cipher, t->version);
}

static int mode_hs(const struct opts *o, double seconds, int procs) {
    int (*pipes)[2] = calloc((size_t)procs, sizeof *pipes);
    pid_t *pids = calloc((size_t)procs, sizeof *pids);
    struct tally sum;
    double start = now();
    int i;
    memset(&sum, 0, sizeof sum);
    for (i = 0; i < procs; i++) {
        if (pipe(pipes[i]) != 0) return 2;
        pids[i] = fork();
        if (pids[i] == 0) {
            struct tally t;
            SSL_CTX *ctx = make_ctx(o);
            double t0 = now(), deadline = t0 + seconds;
            memset(&t, 0, sizeof t);
            close(pipes[i][0]);
            while (now() < deadline) {
                if (one_request(ctx, o, &t) == 0)
                    t.ok++;
                else
                    t.errors++;
            }
            t.elapsed = now() - t0;
            if (write(pipes[i][1], &t, sizeof t) != (ssize_t)sizeof t) _exit(3);
            _exit(0);
        }
        close(pipes[i][1]);
    }
    for (i = 0; i < procs; i++) {
        struct tally t;
        if (read(pipes[i][0], &t, sizeof t) == (ssize_t)sizeof t) {
            sum.ok += t.ok;
            sum.stapled += t.stapled;
            sum.errors += t.errors;
            if (t.staple_len) sum.staple_len = t.staple_len;
            if (t.elapsed > sum.elapsed) sum.elapsed = t.elapsed;
            if (sum.cipher[0] == 0) {
                memcpy(sum.cipher, t.cipher, sizeof sum.cipher);
                memcpy(sum.version, t.version, sizeof sum.version);
            }
        } else {
            sum.errors++;
        }
        close(pipes[i][0]);
        waitpid(pids[i], NULL, 0);
    }
    print_tally(&sum, now() - start);
    return 0;
}

static int mode_get(const struct opts *o) {
    SSL_CTX *ctx = make_ctx(o);
    struct tally t;
    char req[512];
    int fd, http_ok = 0, len;
    long n;
    double t0;
    SSL *ssl;
    memset(&t, 0, sizeof t);
    if (o->plain) {
        t0 = now();
        n = plain_get(o, &http_ok);
        printf("{\"bytes\": %ld, \"http_ok\": %d, \"elapsed\": %.6f, \"cipher\": \"\", "
               "\"staple_len\": 0}\n",
               n, http_ok, now() - t0);
        return n < 0 || !http_ok;
    }
    ssl = tls_connect(ctx, o, &fd);
    if (ssl == NULL) {
        printf("{\"error\": \"connect\"}\n");
        return 1;
    }
    t0 = now();
    len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                   o->path, o->sni ? o->sni : o->host);
    if (write_all(ssl, req, len) != 0) return 1;
    n = read_all(ssl, &http_ok);
    {
        const unsigned char *resp;
        long staple = SSL_get_tlsext_status_ocsp_resp(ssl, &resp);
        printf("{\"bytes\": %ld, \"http_ok\": %d, \"elapsed\": %.6f, \"cipher\": \"%s\", "
               "\"staple_len\": %ld}\n",
               n, http_ok, now() - t0, SSL_get_cipher_name(ssl), staple > 0 ? staple : 0);
    }
    finish(ssl, fd);
    return n < 0 || !http_ok;
}

static int mode_put(const struct opts *o, long bytes) {
    static char chunk[64 * 1024];
    SSL_CTX *ctx = make_ctx(o);
    char req[512];
    int fd, http_ok = 0, len;
    long left = bytes, n;
    double t0;
    SSL *ssl = tls_connect(ctx, o, &fd);
    if (ssl == NULL) {
        printf("{\"error\": \"connect\"}\n");
        return 1;
    }
    memset(chunk, 'x', sizeof chunk);
    t0 = now();
    len = snprintf(req, sizeof req,
                   "POST %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n"
                   "Content-Type: application/octet-stream\r\nContent-Length: %ld\r\n\r\n",
                   o->path, o->sni ? o->sni : o->host, bytes);
    if (write_all(ssl, req, len) != 0) return 1;
    while (left > 0) {
        int part = left < (long)sizeof chunk ? (int)left : (int)sizeof chunk;
        if (write_all(ssl, chunk, part) != 0) {
            printf("{\"error\": \"write\"}\n");
            return 1;
        }
        left -= part;
    }
    n = read_all(ssl, &http_ok);
    printf("{\"bytes\": %ld, \"http_ok\": %d, \"elapsed\": %.6f, \"cipher\": \"%s\"}\n", bytes,
           http_ok, now() - t0, SSL_get_cipher_name(ssl));
    finish(ssl, fd);
    return n < 0 || !http_ok;
}

int main(int argc, char **argv) {
    struct opts o;
    int i, npos = 0;
    const char *pos[8];
    signal(SIGPIPE, SIG_IGN);
    memset(&o, 0, sizeof o);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-tls1_2") == 0)
            o.version = TLS1_2_VERSION;
        else if (strcmp(argv[i], "-tls1_3") == 0)
            o.version = TLS1_3_VERSION;
        else if (strcmp(argv[i], "-status") == 0)
            o.status = 1;
        else if (strcmp(argv[i], "-plain") == 0)
            o.plain = 1;
        else if (strcmp(argv[i], "-sni") == 0 && i + 1 < argc)
            o.sni = argv[++i];
        else if (npos < 8)
            pos[npos++] = argv[i];
    }
    if (npos < 4) {
        fprintf(stderr, "usage: hsclient hs|get|put HOST PORT PATH [...]\n");
        return 2;
    }
    o.host = pos[1];
    o.port = atoi(pos[2]);
    o.path = pos[3];
    if (strcmp(pos[0], "hs") == 0 && npos == 6) return mode_hs(&o, atof(pos[4]), atoi(pos[5]));
    if (strcmp(pos[0], "get") == 0) return mode_get(&o);
    if (strcmp(pos[0], "put") == 0 && npos == 5) return mode_put(&o, atol(pos[4]));
    fprintf(stderr, "usage: hsclient hs|get|put HOST PORT PATH [...]\n");
    return 2;
}
