/*
 * Keep-alive load for the "servers" section: C on the system OpenSSL, like hsclient.c, so the
 * client is cheap and the same for every server. Built on first use by bench/_keepalive.py
 * (cc -O2 kaclient.c -lssl -lcrypto).
 *
 *   kaclient HOST PORT PATH SECONDS PROCS [-tls1_2 | -tls1_3] [-sni NAME] [-plain]
 *
 * Forks PROCS processes; each opens one TLS connection and sends "GET PATH HTTP/1.1"
 * requests on it back to back for SECONDS, one at a time (no pipelining), reading each
 * response's headers and its Content-Length body before the next request. A response must be
 * "HTTP/1.1 200" with a Content-Length. Should the server close the connection, the process
 * opens another (counted in "connections"); a response saying "Connection: close" (nginx's
 * keepalive_requests) is counted, and the connection is then closed and replaced without an
 * error. -plain: plain HTTP over TCP, no TLS ("cipher" and "version" are then empty). Prints
 * one JSON object: {"ok", "errors", "connections", "elapsed", "wall", "cipher", "version"}.
 */
#define _GNU_SOURCE /* memmem */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <openssl/tls1.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct opts {
    const char *host, *path, *sni;
    int port, version, plain;
};

struct tally {
    long ok, errors, connections;
    double elapsed;
    char cipher[64], version[16];
};

struct conn {
    SSL *ssl;
    int fd;
    char buf[64 * 1024];
    size_t have;
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
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (o->version) {
        SSL_CTX_set_min_proto_version(ctx, o->version);
        SSL_CTX_set_max_proto_version(ctx, o->version);
    }
    return ctx;
}

static int open_conn(SSL_CTX *ctx, const struct opts *o, struct conn *c) {
    struct sockaddr_in addr;
    int one = 1;
    c->have = 0;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) return -1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)o->port);
    inet_pton(AF_INET, o->host, &addr.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(c->fd);
        return -1;
    }
    c->ssl = NULL;
    if (o->plain) return 0;
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, c->fd);
    if (o->sni) SSL_set_tlsext_host_name(c->ssl, o->sni);
    if (SSL_connect(c->ssl) != 1) {
        SSL_free(c->ssl);
        close(c->fd);
        return -1;
    }
    return 0;
}

static void close_conn(struct conn *c) {
    if (c->ssl != NULL) {
        SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    close(c->fd);
}

/* Read more into the buffer; -1 on error or end of stream. */
static int fill(struct conn *c) {
    int n;
    if (c->have >= sizeof c->buf) return -1;
    if (c->ssl == NULL)
        n = (int)recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
    else
        n = SSL_read(c->ssl, c->buf + c->have, (int)(sizeof c->buf - c->have));
    if (n <= 0) return -1;
    c->have += (size_t)n;
    return 0;
}

static int send_all(struct conn *c, const char *buf, int len) {
    if (c->ssl != NULL) return SSL_write(c->ssl, buf, len) == len ? 0 : -1;
    while (len > 0) {
        ssize_t n = send(c->fd, buf, (size_t)len, 0);
        if (n <= 0) return -1;
        buf += n;
        len -= (int)n;
    }
    return 0;
}

/* The value of header NAME (lower case, with its colon) in the response head, or NULL. */
static const char *header(const char *head, size_t len, const char *name) {
    const char *p = head, *end = head + len;
    size_t name_len = strlen(name);
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) break;
        if ((size_t)(eol - p) > name_len && strncasecmp(p, name, name_len) == 0)
            return p + name_len;
        p = eol + 1;
    }
    return NULL;
}

static long content_length(const char *head, size_t len) {
    const char *value = header(head, len, "content-length:");
    return value == NULL ? -1 : strtol(value, NULL, 10);
}

/* Does the response say "Connection: close"? */
static int closing(const char *head, size_t len) {
    const char *value = header(head, len, "connection:");
    while (value != NULL && *value == ' ') value++;
    return value != NULL && strncasecmp(value, "close", 5) == 0;
}

/* One request and its response on an open connection: 1 ok and the server closes the
 * connection, 0 ok, -1 failed. */
static int one_request(struct conn *c, const char *req, int req_len) {
    char *head_end;
    size_t head_len, total;
    long body;
    int last;
    if (send_all(c, req, req_len) != 0) return -1;
    while ((head_end = memmem(c->buf, c->have, "\r\n\r\n", 4)) == NULL)
        if (fill(c) != 0) return -1;
    head_len = (size_t)(head_end - c->buf) + 4;
    if (head_len < 12 || memcmp(c->buf, "HTTP/1.1 200", 12) != 0) return -1;
    body = content_length(c->buf, head_len);
    if (body < 0) return -1;
    last = closing(c->buf, head_len);
    total = head_len + (size_t)body;
    if (total > sizeof c->buf) return -1;
    while (c->have < total)
        if (fill(c) != 0) return -1;
    memmove(c->buf, c->buf + total, c->have - total);
    c->have -= total;
    return last;
}

static void worker(const struct opts *o, double seconds, struct tally *t) {
    static struct conn c;
    char req[512];
    SSL_CTX *ctx = make_ctx(o);
    double t0 = now(), deadline = t0 + seconds;
    int open = 0;
    int len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", o->path,
                       o->sni ? o->sni : o->host);
    while (now() < deadline) {
        if (!open) {
            if (open_conn(ctx, o, &c) != 0) {
                t->errors++;
                continue;
            }
            open = 1;
            t->connections++;
            if (t->cipher[0] == 0 && c.ssl != NULL) {
                snprintf(t->cipher, sizeof t->cipher, "%s", SSL_get_cipher_name(c.ssl));
                snprintf(t->version, sizeof t->version, "%s", SSL_get_version(c.ssl));
            }
        }
        switch (one_request(&c, req, len)) {
        case 0:
            t->ok++;
            break;
        case 1:
            t->ok++;
            close_conn(&c);
            open = 0;
            break;
        default:
            t->errors++;
            close_conn(&c);
            open = 0;
        }
    }
    if (open) close_conn(&c);
    t->elapsed = now() - t0;
}

int main(int argc, char **argv) {
    struct opts o;
    struct tally sum;
    const char *pos[5];
    int i, npos = 0, procs;
    int (*pipes)[2];
    pid_t *pids;
    double seconds, start = now();
    signal(SIGPIPE, SIG_IGN);
    memset(&o, 0, sizeof o);
    memset(&sum, 0, sizeof sum);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-tls1_2") == 0)
            o.version = TLS1_2_VERSION;
        else if (strcmp(argv[i], "-tls1_3") == 0)
            o.version = TLS1_3_VERSION;
        else if (strcmp(argv[i], "-sni") == 0 && i + 1 < argc)
            o.sni = argv[++i];
        else if (strcmp(argv[i], "-plain") == 0)
            o.plain = 1;
        else if (npos < 5)
            pos[npos++] = argv[i];
    }
    if (npos != 5) {
        fprintf(stderr, "usage: kaclient HOST PORT PATH SECONDS PROCS [-tls1_3] [-sni NAME] [-plain]\n");
        return 2;
    }
    o.host = pos[0];
    o.port = atoi(pos[1]);
    o.path = pos[2];
    seconds = atof(pos[3]);
    procs = atoi(pos[4]);
    pipes = calloc((size_t)procs, sizeof *pipes);
    pids = calloc((size_t)procs, sizeof *pids);
    for (i = 0; i < procs; i++) {
        if (pipe(pipes[i]) != 0) return 2;
        pids[i] = fork();
        if (pids[i] == 0) {
            struct tally t;
            memset(&t, 0, sizeof t);
            close(pipes[i][0]);
            worker(&o, seconds, &t);
            if (write(pipes[i][1], &t, sizeof t) != (ssize_t)sizeof t) _exit(3);
            _exit(0);
        }
        close(pipes[i][1]);
    }
    for (i = 0; i < procs; i++) {
        struct tally t;
        if (read(pipes[i][0], &t, sizeof t) == (ssize_t)sizeof t) {
            sum.ok += t.ok;
            sum.errors += t.errors;
            sum.connections += t.connections;
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
    printf("{\"ok\": %ld, \"errors\": %ld, \"connections\": %ld, \"elapsed\": %.6f, "
           "\"wall\": %.6f, \"cipher\": \"%s\", \"version\": \"%s\"}\n",
           sum.ok, sum.errors, sum.connections, sum.elapsed, now() - start, sum.cipher,
           sum.version);
    return 0;
}
