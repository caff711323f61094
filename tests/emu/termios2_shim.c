/*
 * A test fixture for running the serial-port tests of an ARM build under qemu-user.
 *
 * qemu-user (7.2 and 10.0 tried) does not implement the termios2 ioctls (TCGETS2,
 * TCSETS2, TCSETSW2, TCSETSF2), and the serialport crate sets every port up with them on
 * Linux: under emulation opening a pty fails with ENOTTY. Preloaded into the emulated
 * process (scripts/emu-run.sh: qemu-aarch64 -E LD_PRELOAD=...), this maps them onto the
 * plain termios ioctls, with the standard baud rates. It is never part of a package: the
 * gateway on a real ARM box talks to a real kernel.
 *
 * It takes LD_PRELOAD out of the process's environment as it loads, so the native
 * programs a test starts (mosquitto, socat, sh) never inherit an ARM library their own
 * loader would complain about; emulated children get it again from emu-run.sh.
 */
#define _GNU_SOURCE
#include <asm/ioctls.h>
#include <asm/termbits.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

__attribute__((constructor)) static void forget_preload(void) { unsetenv("LD_PRELOAD"); }

int ioctl(int fd, unsigned long request, ...);

static int (*real_ioctl)(int, unsigned long, ...);

static const struct { speed_t code; unsigned int rate; } rates[] = {
    {B50, 50}, {B75, 75}, {B110, 110}, {B134, 134}, {B150, 150}, {B200, 200},
    {B300, 300}, {B600, 600}, {B1200, 1200}, {B1800, 1800}, {B2400, 2400},
    {B4800, 4800}, {B9600, 9600}, {B19200, 19200}, {B38400, 38400},
    {B57600, 57600}, {B115200, 115200}, {B230400, 230400}, {B460800, 460800},
    {B500000, 500000}, {B576000, 576000}, {B921600, 921600}, {B1000000, 1000000},
    {B1152000, 1152000}, {B1500000, 1500000}, {B2000000, 2000000},
};

static unsigned int rate_of(speed_t code) {
    for (unsigned i = 0; i < sizeof rates / sizeof rates[0]; i++)
        if (rates[i].code == code) return rates[i].rate;
    return 0;
}

static speed_t code_of(unsigned int rate) {
    for (unsigned i = 0; i < sizeof rates / sizeof rates[0]; i++)
        if (rates[i].rate == rate) return rates[i].code;
    return 0;
}

int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real_ioctl) real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");

    if (request == TCGETS2) {
        struct termios t;
        int r = real_ioctl(fd, TCGETS, &t);
        if (r) return r;
        struct termios2 *t2 = arg;
        memset(t2, 0, sizeof *t2);
        t2->c_iflag = t.c_iflag;
        t2->c_oflag = t.c_oflag;
        t2->c_cflag = t.c_cflag;
        t2->c_lflag = t.c_lflag;
        t2->c_line = t.c_line;
        memcpy(t2->c_cc, t.c_cc, sizeof t.c_cc < sizeof t2->c_cc ? sizeof t.c_cc : sizeof t2->c_cc);
        t2->c_ispeed = t2->c_ospeed = rate_of(t.c_cflag & CBAUD);
        return 0;
    }
    unsigned long plain = request == TCSETS2 ? TCSETS
                        : request == TCSETSW2 ? TCSETSW
                        : request == TCSETSF2 ? TCSETSF : 0;
    if (plain) {
        const struct termios2 *t2 = arg;
        struct termios t;
        memset(&t, 0, sizeof t);
        t.c_iflag = t2->c_iflag;
        t.c_oflag = t2->c_oflag;
        t.c_cflag = t2->c_cflag;
        t.c_lflag = t2->c_lflag;
        t.c_line = t2->c_line;
        memcpy(t.c_cc, t2->c_cc, sizeof t.c_cc < sizeof t2->c_cc ? sizeof t.c_cc : sizeof t2->c_cc);
        if ((t2->c_cflag & CBAUD) == BOTHER) {
            speed_t code = code_of(t2->c_ospeed);
            if (!code) { errno = EINVAL; return -1; }
            t.c_cflag = (t.c_cflag & ~CBAUD) | code;
        }
        return real_ioctl(fd, plain, &t);
    }
    return real_ioctl(fd, request, arg);
}
