/*
 * lws_quirks.c - the one place for libwebsockets 4.1.6 behaviour that its
 * API gives no handle on.
 *
 * A request whose request line and headers do not fit in lws's header space
 * (max_http_header_data) makes lws log "Ran out of header data space" and
 * close the connection at once, without a status and without calling any
 * protocol callback first (the HTTP protocol is not bound yet). A client
 * then sees a reset, not the 431 it is owed. The only moment left is the
 * close itself: lws shuts the socket down with shutdown(2) (plain TCP) or
 * SSL_shutdown (TLS) before closing it. hub_quirk_answer_next_close() arms
 * one answer, and the shutdown that follows on the same call stack writes it
 * first. The hub defines shutdown and SSL_shutdown itself so that lws's
 * calls reach these wrappers (an executable's definition comes first in the
 * dynamic linker's lookup, as malloc replacements rely on); both pass on to
 * the real functions. The armed answer lives for one shutdown or until
 * hub_quirk_disarm(), which the loop calls every turn, so it cannot go to
 * another connection.
 */
#define _GNU_SOURCE
#include "hub/lws_quirks.h"

#include <dlfcn.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <openssl/ssl.h>

static char answer[512];
static size_t answer_len;
static bool armed;

void hub_quirk_answer_next_close(const char *msg, size_t len)
{
	if (len > sizeof(answer))
		len = sizeof(answer);
	memcpy(answer, msg, len);
	answer_len = len;
	armed = true;
}

void hub_quirk_disarm(void)
{
	armed = false;
}

int shutdown(int fd, int how)
{
	if (armed && how != SHUT_RD) {
		armed = false;
		/* Best effort into the empty send buffer of a fresh connection. */
		(void)send(fd, answer, answer_len, MSG_NOSIGNAL | MSG_DONTWAIT);
	}
	return (int)syscall(SYS_shutdown, fd, how);
}

int SSL_shutdown(SSL *s)
{
	static int (*real)(SSL *);

	if (!real)
		real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_shutdown");
	if (armed && s) {
		armed = false;
		(void)SSL_write(s, answer, (int)answer_len);
	}
	return real ? real(s) : -1;
}
