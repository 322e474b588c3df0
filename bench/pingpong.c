/* pingpong: the benchmark's request/response and probe tool (bench/run builds it
 * with gcc into target/bench/). Only talks to the addresses it is given, which
 * bench/run keeps inside its own network namespaces.
 *
 *   pingpong server PORT [PORT...] | server RANGE_LO-RANGE_HI
 *       echo fixed-size messages on every accepted TCP connection (a thread each);
 *       a connection that sends nothing and closes (a probe) is simply closed.
 *   pingpong client HOST PORT SIZE SECONDS MAXCOUNT
 *       one TCP connection (TCP_NODELAY), SIZE-byte request, same-size response,
 *       repeated for SECONDS or MAXCOUNT round trips; prints one JSON object with
 *       count, p50_us, p90_us, p99_us, mean_us, min_us, max_us.
 *   pingpong probe HOST PORT TIMEOUT_S INTERVAL_US [SRC]
 *       tries a fresh TCP connection every INTERVAL_US until one is accepted
 *       (from source address SRC when given: a host address of this namespace).
 *       Prints "armed T" (CLOCK_MONOTONIC ns) after the first refused/dropped
 *       attempt, then "ok T" when a connection is established, "open T" if the
 *       very first attempt already succeeded, "timeout T" after TIMEOUT_S.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r == 0) return 0;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        got += (size_t)r;
    }
    return 1;
}

static int write_full(int fd, const char *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        put += (size_t)w;
    }
    return 1;
}

/* ---- server ---- */

static void *serve_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* First 4 bytes: the message size the client will use. */
    uint32_t size_be;
    if (read_full(fd, (char *)&size_be, 4) != 1) goto out;
    uint32_t size = ntohl(size_be);
    if (size == 0 || size > MAX_SIZE) goto out;
    char *buf = malloc(size);
    if (!buf) goto out;
    for (;;) {
        if (read_full(fd, buf, size) != 1) break;
        if (write_full(fd, buf, size) != 1) break;
    }
    free(buf);
out:
    close(fd);
    return NULL;
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1024) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmd_server(int argc, char **argv) {
    int ports[4096];
    int n = 0;
    for (int i = 0; i < argc && n < 4096; i++) {
        int lo, hi;
        if (sscanf(argv[i], "%d-%d", &lo, &hi) == 2) {
            for (int p = lo; p <= hi && n < 4096; p++) ports[n++] = p;
        } else {
            ports[n++] = atoi(argv[i]);
        }
    }
    struct pollfd *pfds = calloc((size_t)n, sizeof *pfds);
    if (!pfds) return 1;
    for (int i = 0; i < n; i++) {
        pfds[i].fd = listen_on(ports[i]);
        if (pfds[i].fd < 0) {
            fprintf(stderr, "pingpong: cannot listen on port %d: %s\n", ports[i], strerror(errno));
            return 1;
        }
        pfds[i].events = POLLIN;
    }
    printf("listening %d\n", n);
    fflush(stdout);
    for (;;) {
        if (poll(pfds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (!(pfds[i].revents & POLLIN)) continue;
            int c = accept(pfds[i].fd, NULL, NULL);
            if (c < 0) continue;
            pthread_t t;
            if (pthread_create(&t, NULL, serve_conn, (void *)(intptr_t)c) != 0) {
                close(c);
                continue;
            }
            pthread_detach(t);
        }
    }
}

/* ---- client ---- */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int connect_to(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        close(fd);
        errno = EINVAL;
        return -1;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmd_client(int argc, char **argv) {
    if (argc < 5) return 2;
    const char *host = argv[0];
    int port = atoi(argv[1]);
    size_t size = (size_t)atol(argv[2]);
    double secs = atof(argv[3]);
    long maxcount = atol(argv[4]);
    if (size < 1 || size > MAX_SIZE || maxcount < 1) return 2;
    int fd = connect_to(host, port);
    if (fd < 0) {
        printf("{\"error\": \"connect: %s\"}\n", strerror(errno));
        return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint32_t size_be = htonl((uint32_t)size);
    char *buf = calloc(1, size);
    uint64_t *samples = malloc(sizeof(uint64_t) * (size_t)maxcount);
    if (!buf || !samples) return 1;
    if (write_full(fd, (char *)&size_be, 4) != 1) {
        printf("{\"error\": \"write: %s\"}\n", strerror(errno));
        return 1;
    }
    uint64_t start = now_ns(), deadline = start + (uint64_t)(secs * 1e9);
    long n = 0;
    while (n < maxcount) {
        uint64_t t0 = now_ns();
        if (t0 > deadline) break;
        if (write_full(fd, buf, size) != 1 || read_full(fd, buf, size) != 1) {
            printf("{\"error\": \"round trip %ld: %s\", \"count\": %ld}\n", n, strerror(errno), n);
            return 1;
        }
        samples[n++] = now_ns() - t0;
    }
    close(fd);
    if (n == 0) {
        printf("{\"error\": \"no round trip completed\", \"count\": 0}\n");
        return 1;
    }
    double sum = 0;
    for (long i = 0; i < n; i++) sum += (double)samples[i];
    qsort(samples, (size_t)n, sizeof *samples, cmp_u64);
#define PCT(p) ((double)samples[(long)((double)(n - 1) * (p))] / 1000.0)
    printf("{\"count\": %ld, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"mean_us\": %.2f, "
           "\"min_us\": %.2f, \"max_us\": %.2f}\n",
           n, PCT(0.50), PCT(0.90), PCT(0.99), sum / (double)n / 1000.0, (double)samples[0] / 1000.0,
           (double)samples[n - 1] / 1000.0);
    return 0;
}

/* ---- probe ---- */

/* One attempt: 1 = connected, 0 = dropped/refused within the interval, -1 = error. */
static int attempt(const struct sockaddr_in *a, const struct sockaddr_in *src, long interval_us) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (src && bind(fd, (const struct sockaddr *)src, sizeof *src) != 0) {
        close(fd);
        return -1;
    }
    int r = connect(fd, (const struct sockaddr *)a, sizeof *a);
    int result = 0;
    if (r == 0) {
        result = 1;
    } else if (errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        struct timespec ts = {.tv_sec = interval_us / 1000000, .tv_nsec = (interval_us % 1000000) * 1000};
        if (ppoll(&p, 1, &ts, NULL) == 1) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            result = err == 0 ? 1 : 0;
            if (err != 0) {
                /* refused (RST): wait out the rest of the interval so we do not spin */
                usleep((useconds_t)(interval_us / 2));
            }
        }
    }
    close(fd);
    return result;
}

static int cmd_probe(int argc, char **argv) {
    if (argc < 4) return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (inet_pton(AF_INET, argv[0], &a.sin_addr) != 1) return 2;
    double timeout = atof(argv[2]);
    long interval_us = atol(argv[3]);
    struct sockaddr_in src = {.sin_family = AF_INET};
    int have_src = argc >= 5;
    if (have_src && inet_pton(AF_INET, argv[4], &src.sin_addr) != 1) return 2;
    uint64_t deadline = now_ns() + (uint64_t)(timeout * 1e9);
    int first = 1;
    for (;;) {
        int r = attempt(&a, have_src ? &src : NULL, interval_us);
        uint64_t t = now_ns();
        if (r < 0) {
            printf("error %llu %s\n", (unsigned long long)t, strerror(errno));
            return 1;
        }
        if (r == 1) {
            printf("%s %llu\n", first ? "open" : "ok", (unsigned long long)t);
            fflush(stdout);
            return 0;
        }
        if (first) {
            printf("armed %llu\n", (unsigned long long)t);
            fflush(stdout);
            first = 0;
        }
        if (t > deadline) {
            printf("timeout %llu\n", (unsigned long long)t);
            return 1;
        }
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fprintf(stderr, "usage: pingpong server|client|probe ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "server")) return cmd_server(argc - 2, argv + 2);
    if (!strcmp(argv[1], "client")) return cmd_client(argc - 2, argv + 2);
    if (!strcmp(argv[1], "probe")) return cmd_probe(argc - 2, argv + 2);
    fprintf(stderr, "pingpong: unknown mode %s\n", argv[1]);
    return 2;
}
