/*
 * floor: the least any Modbus RTU master can spend per sample on this machine, for
 * BENCHMARKS.md's issue-13 section. One thread, blocking system calls, no runtime, no
 * allocation, no decoding beyond the CRC: it polls U units on a serial port as
 * servogate's `line` and `instant` benchmarks do (read 10 holding registers, keep t3.5
 * after every reply, each unit every POLL) and, with MQTT set, sends each reply's sample
 * as one QoS 1 PUBLISH of a fixed 200-byte JSON body to a broker on loopback.
 *
 *   floor PORT UNITS POLL_US T35_US [MQTT_PORT MODE]
 *
 * MODE: "prompt" reads every PUBACK as it arrives (a reader that sleeps on the socket:
 * one more wake-up per sample, as any client that notices a lost broker at once);
 * "lazy" reads the PUBACKs that are there when the next sample goes out (no wake-up:
 * the cheapest a QoS 1 publisher can be); "threads" is servogate's shape (DESIGN.md
 * section 1: the bus on a thread of its own): the bus thread hands each sample to a
 * publishing thread through a lock-free ring and an eventfd, and that thread publishes
 * it and sleeps on the eventfd and the socket (so it wakes for the sample and for its
 * PUBACK). Without MQTT: the bus alone.
 *
 * It is not a gateway (no timeouts worth the name, no events, no quality): a measuring
 * stick. Run it through hil/bench/floor-run.sh as bench.sh's GW_BIN so the rig and the
 * counting are the gateway's own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static uint16_t crc16(const uint8_t *p, size_t n) {
    uint16_t crc = 0xFFFF;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) crc = (crc & 1) ? (crc >> 1) ^ 0xA001 : crc >> 1;
    }
    return crc;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void sleep_until(int64_t ns) {
    struct timespec t = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static int mqtt = -1, prompt = 0;
static unsigned pending_acks = 0;

static void drain_acks(int block) {
    uint8_t buf[4096];
    while (pending_acks > 0) {
        ssize_t n = recv(mqtt, buf, sizeof buf, block ? 0 : MSG_DONTWAIT);
        if (n <= 0) return;
        pending_acks -= (unsigned)n / 4 < pending_acks ? (unsigned)n / 4 : pending_acks;
        if (!block) continue;
        return;
    }
}

static void mqtt_connect(int port) {
    mqtt = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(mqtt, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); exit(1); }
    int one = 1;
    setsockopt(mqtt, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* CONNECT, MQTT 3.1.1, clean session, keep-alive 0 (no pings to distort the count) */
    static const uint8_t c[] = {0x10, 17, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 0, 0, 5, 'f', 'l', 'o', 'o', 'r'};
    if (write(mqtt, c, sizeof c) != sizeof c) { perror("write"); exit(1); }
    uint8_t ack[4];
    if (read(mqtt, ack, 4) != 4 || ack[0] != 0x20) { fprintf(stderr, "no CONNACK\n"); exit(1); }
}

static void publish(unsigned unit, uint16_t id, const uint8_t *regs) {
    uint8_t p[300];
    char topic[64];
    int tl = snprintf(topic, sizeof topic, "floor/axis-%u/telemetry", unit);
    char body[200];
    memset(body, ' ', sizeof body);
    int bl = snprintf(body, sizeof body, "{\"seq\":%u,\"position\":%u,\"velocity\":%u}", id, regs[0] << 8 | regs[1], regs[2] << 8 | regs[3]);
    body[bl] = ' ';
    size_t rem = 2 + tl + 2 + sizeof body, i = 0;
    p[i++] = 0x32; /* PUBLISH QoS 1 */
    p[i++] = (rem & 0x7F) | 0x80;
    p[i++] = rem >> 7;
    p[i++] = 0; p[i++] = tl;
    memcpy(p + i, topic, tl); i += tl;
    p[i++] = id >> 8; p[i++] = id & 0xFF;
    memcpy(p + i, body, sizeof body); i += sizeof body;
    if (write(mqtt, p, i) != (ssize_t)i) { perror("publish"); exit(1); }
    pending_acks++;
}

/* "threads": a single-producer single-consumer ring of samples and the eventfd that
 * wakes the publishing thread. */
#define RING 1024
static struct { unsigned unit; uint16_t id; uint8_t regs[20]; } ring[RING];
static _Atomic unsigned head, tail;
static int wake_fd = -1;

static void *publisher(void *arg) {
    (void)arg;
    for (;;) {
        struct pollfd p[2] = {{.fd = wake_fd, .events = POLLIN}, {.fd = mqtt, .events = POLLIN}};
        if (poll(p, pending_acks ? 2 : 1, -1) <= 0) continue;
        if (p[0].revents) {
            uint64_t n;
            if (read(wake_fd, &n, sizeof n) < 0) { perror("eventfd"); exit(1); }
            unsigned t = atomic_load_explicit(&tail, memory_order_relaxed);
            while (t != atomic_load_explicit(&head, memory_order_acquire)) {
                publish(ring[t % RING].unit, ring[t % RING].id, ring[t % RING].regs);
                atomic_store_explicit(&tail, ++t, memory_order_release);
            }
        }
        if (p[1].revents) drain_acks(1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 7) {
        fprintf(stderr, "usage: floor PORT UNITS POLL_US T35_US [MQTT_PORT prompt|lazy]\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_NOCTTY);
    if (fd < 0) { perror(argv[1]); return 1; }
    struct termios t;
    tcgetattr(fd, &t);
    cfmakeraw(&t);
    cfsetspeed(&t, B115200);
    tcsetattr(fd, TCSANOW, &t);
    unsigned units = atoi(argv[2]);
    int64_t poll_ns = atoll(argv[3]) * 1000, t35_ns = atoll(argv[4]) * 1000;
    if (argc == 7) {
        mqtt_connect(atoi(argv[5]));
        prompt = strcmp(argv[6], "prompt") == 0;
        if (strcmp(argv[6], "threads") == 0) {
            wake_fd = eventfd(0, 0);
            pthread_t t;
            pthread_create(&t, NULL, publisher, NULL);
        }
    }
    int64_t next_poll = now_ns(), quiet_from = 0;
    uint16_t id = 1;
    for (;;) {
        for (unsigned u = 1; u <= units; u++) {
            sleep_until(quiet_from + t35_ns);
            uint8_t req[8] = {u, 3, 0, 0, 0, 10};
            uint16_t c = crc16(req, 6);
            req[6] = c & 0xFF; req[7] = c >> 8;
            if (write(fd, req, 8) != 8) { perror("write"); return 1; }
            uint8_t rep[256];
            size_t got = 0;
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            while (got < 25) {
                if (poll(&pf, 1, 100) <= 0) break; /* the reply's wait: one wake-up */
                ssize_t n = read(fd, rep + got, sizeof rep - got);
                if (n <= 0) break;
                got += n;
            }
            quiet_from = now_ns();
            if (got < 25 || crc16(rep, 25) != 0) continue;
            if (wake_fd >= 0) {
                unsigned h = atomic_load_explicit(&head, memory_order_relaxed);
                if (h - atomic_load_explicit(&tail, memory_order_acquire) < RING) {
                    ring[h % RING].unit = u;
                    ring[h % RING].id = id;
                    memcpy(ring[h % RING].regs, rep + 3, 20);
                    atomic_store_explicit(&head, h + 1, memory_order_release);
                    id = id == 0xFFFF ? 1 : id + 1;
                    uint64_t one = 1;
                    if (write(wake_fd, &one, sizeof one) < 0) { perror("eventfd"); return 1; }
                }
            } else if (mqtt >= 0) {
                if (!prompt) drain_acks(0);
                publish(u, id, rep + 3);
                id = id == 0xFFFF ? 1 : id + 1;
                if (prompt) {
                    /* A reader on the socket wakes for the PUBACK, before t3.5 is up. */
                    struct pollfd mp = {.fd = mqtt, .events = POLLIN};
                    if (poll(&mp, 1, 100) > 0) drain_acks(1);
                }
            }
        }
        next_poll += poll_ns;
        if (next_poll > now_ns()) sleep_until(next_poll);
        else next_poll = now_ns();
    }
}
