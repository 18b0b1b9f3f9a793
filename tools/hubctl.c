/*
 * hubctl: operator command line for iot-hub (CONTRACT.md §4 HTTP API, and the
 * §3 dashboard stream for `send --wait` and `tail`). docs/hubctl.md.
 *
 * A short-lived, single-threaded client that does one thing at a time, so it
 * uses blocking-style I/O over non-blocking sockets with poll() and deadlines
 * (plain sockets, OpenSSL for https/wss) and a small RFC 6455 client of its
 * own, rather than an lws client context: one request or one stream at a
 * time needs no event loop, and the lws 4.1.6 client-on-libev timer quirks
 * (docs/simulator.md "Timers") do not arise.
 *
 * Bounds: response heads 64 KiB, bodies 32 MiB, WebSocket messages 8 MiB,
 * --params 64 KiB (the hub's body cap), key files 4 KiB. Over a bound is a
 * clean error, never a crash.
 *
 * Exit codes (docs/hubctl.md): 0 ok / command succeeded; 1 command ended
 * failed|rejected|timed_out|expired|canceled (--wait), or a rollout aborted
 * or with any failed|rejected|timed_out|expired command (send-fleet
 * --wait); 2 usage; 3 HTTP 4xx
 * (or a stream error answer); 4 hub unreachable, timed out or 5xx; 5 --wait
 * (or tail --count) timed out; 130 interrupted during --wait.
 */

#define _GNU_SOURCE
#include <jansson.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
	EX_OK = 0,
	EX_CMD_FAILED = 1,
	EX_USAGE = 2,
	EX_HTTP_4XX = 3,
	EX_UNREACHABLE = 4,
	EX_WAIT_TIMEOUT = 5,
	EX_INTERRUPTED = 130,
};

#define CTL_DEFAULT_URL     "http://127.0.0.1:8080"
#define CTL_DEFAULT_TIMEOUT 10.0           /* s, per request when no --timeout */
#define CTL_HEAD_MAX        (64u << 10)
#define CTL_BODY_MAX        (32u << 20)
#define CTL_WS_MSG_MAX      (8u << 20)
#define CTL_PARAMS_MAX      (64u << 10)
#define CTL_KEY_MAX         4096u
#define CTL_POLL_SLICE_MS   200
#define CTL_POLL_INTERVAL   500            /* ms between GETs when polling */
#define CTL_SUBPROTOCOL     "iot-dashboard.v1"

/* transport results (negative) */
enum { E_NET = -1, E_TIMEOUT = -2, E_INTR = -3, E_PROTO = -4, E_BIG = -5 };

/* ------------------------------------------------------------------------ */
/* global options                                                             */

static struct {
	int tls;
	char *host;          /* no brackets */
	char *port;
	char *host_hdr;      /* Host: value */
	char *prefix;        /* path prefix without trailing '/', may be "" */
	const char *url;
	char *key;
	int json;
	double timeout;      /* s; < 0: not given */
	const char *cafile;
	int insecure;
	int verbose;
} o = { .timeout = -1 };

static volatile sig_atomic_t g_interrupted;
static int64_t g_deadline;   /* monotonic ms; 0 = none (from --timeout) */
static char g_err[512];      /* the last transport error */
static SSL_CTX *g_ssl_ctx;

static void
on_sigint(int sig)
{
	(void)sig;
	g_interrupted = 1;
}

static void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void set_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
die_usage(const char *fmt, ...)
{
	va_list ap;

	fputs("hubctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (hubctl --help)\n", stderr);
	exit(EX_USAGE);
}

static void
set_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(g_err, sizeof(g_err), fmt, ap);
	va_end(ap);
}

static void *
xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		fprintf(stderr, "hubctl: out of memory (%zu bytes)\n", n);
		abort();
	}
	return p;
}

static void *
xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q) {
		fprintf(stderr, "hubctl: out of memory (%zu bytes)\n", n);
		abort();
	}
	return q;
}

static char *
xstrndup(const char *s, size_t n)
{
	char *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

static int64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* the deadline of one request: --timeout's overall deadline, else 10 s */
static int64_t
req_deadline(void)
{
	if (g_deadline)
		return g_deadline;
	return mono_ms() + (int64_t)(CTL_DEFAULT_TIMEOUT * 1000);
}

/* t (monotonic ms), or the --timeout deadline if that comes first */
static int64_t
until_deadline(int64_t t)
{
	return g_deadline && g_deadline < t ? g_deadline : t;
}

/* sleeps until t (monotonic ms), the --timeout deadline or Ctrl-C, whichever
 * comes first */
static void
nap_until(int64_t t)
{
	int64_t left;

	t = until_deadline(t);
	while (!g_interrupted && (left = t - mono_ms()) > 0)
		poll(NULL, 0, (int)(left > CTL_POLL_SLICE_MS ? CTL_POLL_SLICE_MS : left));
}

/* ------------------------------------------------------------------------ */
/* growable string (aborts on OOM; callers cap what peers can make it hold)  */

struct sbuf {
	char *d;
	size_t len, cap;
};

static void
sb_add(struct sbuf *b, const void *p, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t c = b->cap ? b->cap : 256;

		while (c < b->len + n + 1)
			c *= 2;
		b->d = xrealloc(b->d, c);
		b->cap = c;
	}
	memcpy(b->d + b->len, p, n);
	b->len += n;
	b->d[b->len] = '\0';
}

static void
sb_puts(struct sbuf *b, const char *s)
{
	sb_add(b, s, strlen(s));
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
sb_printf(struct sbuf *b, const char *fmt, ...)
{
	char tmp[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n < sizeof(tmp)) {
		sb_add(b, tmp, (size_t)n);
		return;
	}
	{
		char *big = xmalloc((size_t)n + 1);

		va_start(ap, fmt);
		vsnprintf(big, (size_t)n + 1, fmt, ap);
		va_end(ap);
		sb_add(b, big, (size_t)n);
		free(big);
	}
}

/* percent-encode everything but unreserved characters (RFC 3986) */
static void
sb_urlenc(struct sbuf *b, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' ||
		    c == ':') {
			sb_add(b, s, 1);
		} else {
			char e[3] = { '%', hex[c >> 4], hex[c & 15] };

			sb_add(b, e, 3);
		}
	}
}

static void
sb_free(struct sbuf *b)
{
	free(b->d);
	memset(b, 0, sizeof(*b));
}

/* ------------------------------------------------------------------------ */
/* connections: TCP (+ TLS), non-blocking, every wait bounded by a deadline   */

struct conn {
	int fd;
	SSL *ssl;
	char rbuf[CTL_HEAD_MAX];
	size_t rpos, rlen;
};

/* waits for events on fd; 0 when ready, E_TIMEOUT or E_INTR */
static int
wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int64_t left = CTL_POLL_SLICE_MS;
		int r;

		if (g_interrupted)
			return E_INTR;
		if (deadline) {
			left = deadline - mono_ms();
			if (left <= 0)
				return E_TIMEOUT;
			if (left > CTL_POLL_SLICE_MS)
				left = CTL_POLL_SLICE_MS;
		}
		r = poll(&p, 1, (int)left);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR) {
			set_err("poll: %s", strerror(errno));
			return E_NET;
		}
	}
}

static int
tls_init(void)
{
	if (g_ssl_ctx)
		return 0;
	g_ssl_ctx = SSL_CTX_new(TLS_client_method());
	if (!g_ssl_ctx) {
		set_err("TLS: cannot create a context");
		return E_NET;
	}
	SSL_CTX_set_min_proto_version(g_ssl_ctx, TLS1_2_VERSION);
	if (o.insecure) {
		SSL_CTX_set_verify(g_ssl_ctx, SSL_VERIFY_NONE, NULL);
		return 0;
	}
	SSL_CTX_set_verify(g_ssl_ctx, SSL_VERIFY_PEER, NULL);
	if (o.cafile) {
		if (SSL_CTX_load_verify_locations(g_ssl_ctx, o.cafile, NULL) != 1) {
			set_err("--cafile %s: cannot load it (%s)", o.cafile,
				ERR_reason_error_string(ERR_get_error()));
			return E_NET;
		}
	} else {
		SSL_CTX_set_default_verify_paths(g_ssl_ctx);
	}
	return 0;
}

static int
is_ip_literal(const char *h)
{
	struct in6_addr a6;
	struct in_addr a4;

	return inet_pton(AF_INET, h, &a4) == 1 || inet_pton(AF_INET6, h, &a6) == 1;
}

static int
tls_handshake(struct conn *c, int64_t deadline)
{
	int r, e;

	if (tls_init())
		return E_NET;
	c->ssl = SSL_new(g_ssl_ctx);
	if (!c->ssl) {
		set_err("TLS: out of memory");
		return E_NET;
	}
	SSL_set_fd(c->ssl, c->fd);
	if (!is_ip_literal(o.host))
		SSL_set_tlsext_host_name(c->ssl, o.host);
	if (!o.insecure) {
		X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);

		if (is_ip_literal(o.host))
			X509_VERIFY_PARAM_set1_ip_asc(vp, o.host);
		else
			X509_VERIFY_PARAM_set1_host(vp, o.host, 0);
	}
	for (;;) {
		ERR_clear_error();
		r = SSL_connect(c->ssl);
		if (r == 1)
			return 0;
		e = SSL_get_error(c->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			int w = wait_fd(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
					deadline);

			if (w == E_TIMEOUT)
				set_err("TLS handshake with %s:%s timed out", o.host, o.port);
			if (w)
				return w;
			continue;
		}
		{
			long vr = SSL_get_verify_result(c->ssl);
			unsigned long el = ERR_get_error();

			if (vr != X509_V_OK)
				set_err("TLS: the hub's certificate does not verify: %s "
					"(--cafile?)", X509_verify_cert_error_string(vr));
			else
				set_err("TLS handshake with %s:%s failed: %s", o.host,
					o.port, el ? ERR_reason_error_string(el) :
					"connection closed");
		}
		return E_NET;
	}
}

static void
conn_close(struct conn *c)
{
	if (!c)
		return;
	if (c->ssl) {
		SSL_free(c->ssl);
		c->ssl = NULL;
	}
	if (c->fd >= 0)
		close(c->fd);
	free(c);
}

/* connects to the hub; NULL with g_err set (and *why = E_*) on failure */
static struct conn *
conn_open(int64_t deadline, int *why)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *res = NULL, *ai;
	struct conn *c;
	int r, fd = -1, last = E_NET;

	*why = E_NET;
	r = getaddrinfo(o.host, o.port, &hints, &res);
	if (r) {
		set_err("cannot resolve %s: %s", o.host, gai_strerror(r));
		return NULL;
	}
	set_err("cannot connect to %s:%s", o.host, o.port);
	for (ai = res; ai; ai = ai->ai_next) {
		int soerr = 0;
		socklen_t sl = sizeof(soerr);

		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			break;
		if (errno != EINPROGRESS) {
			set_err("cannot connect to %s:%s: %s", o.host, o.port,
				strerror(errno));
			close(fd);
			fd = -1;
			continue;
		}
		r = wait_fd(fd, POLLOUT, deadline);
		if (r) {
			last = r;
			if (r == E_TIMEOUT)
				set_err("connecting to %s:%s timed out", o.host, o.port);
			close(fd);
			fd = -1;
			if (r == E_INTR)
				break;
			continue;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && !soerr)
			break;
		set_err("cannot connect to %s:%s: %s", o.host, o.port,
			strerror(soerr ? soerr : errno));
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		*why = last;
		return NULL;
	}
	{
		int one = 1;

		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
	c = xmalloc(sizeof(*c));
	c->fd = fd;
	c->ssl = NULL;
	c->rpos = c->rlen = 0;
	if (o.tls && (r = tls_handshake(c, deadline))) {
		*why = r;
		conn_close(c);
		return NULL;
	}
	return c;
}

static int
conn_write(struct conn *c, const void *buf, size_t n, int64_t deadline)
{
	const char *p = buf;

	while (n) {
		short ev = POLLOUT;
		int w;

		if (c->ssl) {
			int r, e;

			ERR_clear_error();
			r = SSL_write(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
			if (r > 0) {
				p += r;
				n -= (size_t)r;
				continue;
			}
			e = SSL_get_error(c->ssl, r);
			if (e == SSL_ERROR_WANT_READ)
				ev = POLLIN;
			else if (e != SSL_ERROR_WANT_WRITE) {
				set_err("TLS write to the hub failed");
				return E_NET;
			}
		} else {
			ssize_t r = send(c->fd, p, n, MSG_NOSIGNAL);

			if (r > 0) {
				p += r;
				n -= (size_t)r;
				continue;
			}
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
				set_err("write to the hub failed: %s", strerror(errno));
				return E_NET;
			}
		}
		w = wait_fd(c->fd, ev, deadline);
		if (w == E_TIMEOUT)
			set_err("the hub did not take the request in time");
		if (w)
			return w;
	}
	return 0;
}

/* reads into buf: > 0 bytes, 0 EOF, or E_* */
static int
conn_read_raw(struct conn *c, char *buf, size_t n, int64_t deadline)
{
	for (;;) {
		short ev = POLLIN;
		int w;

		if (g_interrupted)
			return E_INTR;
		if (c->ssl) {
			int r, e;

			ERR_clear_error();
			r = SSL_read(c->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
			if (r > 0)
				return r;
			e = SSL_get_error(c->ssl, r);
			if (e == SSL_ERROR_ZERO_RETURN)
				return 0;
			if (e == SSL_ERROR_WANT_WRITE)
				ev = POLLOUT;
			else if (e != SSL_ERROR_WANT_READ) {
				/* a close without close_notify: EOF to us */
				if (e == SSL_ERROR_SYSCALL || ERR_peek_error() == 0)
					return 0;
				set_err("TLS read from the hub failed: %s",
					ERR_reason_error_string(ERR_get_error()));
				return E_NET;
			}
		} else {
			ssize_t r = recv(c->fd, buf, n, 0);

			if (r >= 0)
				return (int)r;
			if (errno == ECONNRESET)
				return 0;
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				set_err("read from the hub failed: %s", strerror(errno));
				return E_NET;
			}
		}
		w = wait_fd(c->fd, ev, deadline);
		if (w)
			return w;
	}
}

/* more bytes into rbuf: > 0, 0 EOF, E_* ; E_BIG when rbuf is full */
static int
conn_fill(struct conn *c, int64_t deadline)
{
	int r;

	if (c->rpos == c->rlen) {
		c->rpos = c->rlen = 0;
	} else if (c->rpos && c->rlen == sizeof(c->rbuf)) {
		memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
		c->rlen -= c->rpos;
		c->rpos = 0;
	}
	if (c->rlen == sizeof(c->rbuf))
		return E_BIG;
	r = conn_read_raw(c, c->rbuf + c->rlen, sizeof(c->rbuf) - c->rlen, deadline);
	if (r > 0)
		c->rlen += (size_t)r;
	return r;
}

/* exactly n bytes (or fewer at EOF when eof_ok): count read, or E_* */
static long
conn_read(struct conn *c, char *dst, size_t n, int64_t deadline, int eof_ok)
{
	size_t got = 0;

	while (got < n) {
		size_t have = c->rlen - c->rpos;

		if (have) {
			size_t k = have < n - got ? have : n - got;

			memcpy(dst + got, c->rbuf + c->rpos, k);
			c->rpos += k;
			got += k;
			continue;
		}
		{
			int r = conn_fill(c, deadline);

			if (r == 0) {
				if (eof_ok)
					return (long)got;
				set_err("the hub closed the connection mid-response");
				return E_PROTO;
			}
			if (r < 0)
				return r;
		}
	}
	return (long)got;
}

/* the response head up to and including CRLF CRLF, NUL-terminated copy */
static int
conn_read_head(struct conn *c, char **head, int64_t deadline)
{
	for (;;) {
		char *s = c->rbuf + c->rpos;
		size_t have = c->rlen - c->rpos;
		char *e = memmem(s, have, "\r\n\r\n", 4);
		int r;

		if (e) {
			size_t n = (size_t)(e - s) + 4;

			*head = xstrndup(s, n);
			c->rpos += n;
			return 0;
		}
		r = conn_fill(c, deadline);
		if (r == E_BIG) {
			set_err("the hub's response head is over %u bytes", CTL_HEAD_MAX);
			return E_PROTO;
		}
		if (r == 0) {
			set_err(have ? "the hub closed the connection mid-response"
				     : "the hub closed the connection without answering");
			return E_NET;
		}
		if (r < 0) {
			if (r == E_TIMEOUT)
				set_err("no answer from the hub in time");
			return r;
		}
	}
}

/* the value of header name in head (case-insensitive), copied; NULL if absent */
static char *
head_get(const char *head, const char *name)
{
	size_t nl = strlen(name);
	const char *p = strstr(head, "\r\n");

	while (p && p[2] && !(p[2] == '\r' && p[3] == '\n')) {
		const char *line = p + 2, *end = strstr(line, "\r\n");

		if (!end)
			break;
		if ((size_t)(end - line) > nl && line[nl] == ':' &&
		    !strncasecmp(line, name, nl)) {
			const char *v = line + nl + 1;

			while (v < end && (*v == ' ' || *v == '\t'))
				v++;
			{
				const char *ve = end;

				while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
					ve--;
				return xstrndup(v, (size_t)(ve - v));
			}
		}
		p = end;
	}
	return NULL;
}

static int
head_status(const char *head)
{
	int st;

	if (sscanf(head, "HTTP/%*d.%*d %3d", &st) != 1 || st < 100 || st > 599)
		return -1;
	return st;
}

/* ------------------------------------------------------------------------ */
/* HTTP                                                                       */

struct http_resp {
	int status;
	char *body;
	size_t len;
};

static void
request_head(struct sbuf *b, const char *method, const char *path, size_t body_len,
	     const char *idem)
{
	sb_printf(b, "%s %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: hubctl\r\n"
		  "Accept: application/json\r\nConnection: close\r\n", method,
		  o.prefix, path, o.host_hdr);
	if (o.key)
		sb_printf(b, "Authorization: Bearer %s\r\n", o.key);
	if (idem)
		sb_printf(b, "Idempotency-Key: %s\r\n", idem);
	if (body_len || !strcmp(method, "POST"))
		sb_printf(b, "Content-Type: application/json\r\nContent-Length: %zu\r\n",
			  body_len);
}

static int
read_chunked(struct conn *c, struct sbuf *out, int64_t deadline)
{
	for (;;) {
		char line[64];
		size_t k = 0;
		unsigned long long n;
		char *end;
		long r;

		/* chunk-size line */
		for (;;) {
			char ch;

			r = conn_read(c, &ch, 1, deadline, 0);
			if (r < 0)
				return (int)r;
			if (ch == '\n')
				break;
			if (k < sizeof(line) - 1)
				line[k++] = ch;
		}
		line[k] = '\0';
		errno = 0;
		n = strtoull(line, &end, 16);
		if (end == line || errno) {
			set_err("bad chunk in the hub's response");
			return E_PROTO;
		}
		if (n == 0) {
			/* trailers, up to the empty line */
			for (;;) {
				char ch, prev = 0;
				size_t len = 0;

				for (;;) {
					r = conn_read(c, &ch, 1, deadline, 1);
					if (r <= 0)
						return r < 0 ? (int)r : 0;
					if (ch == '\n')
						break;
					if (ch != '\r')
						len++;
					prev = ch;
				}
				(void)prev;
				if (!len)
					return 0;
			}
		}
		if (n > CTL_BODY_MAX || out->len + n > CTL_BODY_MAX) {
			set_err("the hub's response is over %u bytes", CTL_BODY_MAX);
			return E_BIG;
		}
		{
			size_t at = out->len;

			sb_add(out, "", 0);
			if (out->cap < at + n + 1) {
				out->d = xrealloc(out->d, at + n + 1);
				out->cap = at + n + 1;
			}
			r = conn_read(c, out->d + at, (size_t)n, deadline, 0);
			if (r < 0)
				return (int)r;
			out->len = at + (size_t)n;
			out->d[out->len] = '\0';
		}
		{
			char crlf[2];

			r = conn_read(c, crlf, 2, deadline, 0);
			if (r < 0)
				return (int)r;
		}
	}
}

/*
 * One request on a fresh connection (Connection: close). Returns 0 with
 * *resp filled (any status), or E_* with g_err set.
 */
static int
http_request(const char *method, const char *path, const char *body,
	     const char *idem, struct http_resp *resp)
{
	int64_t deadline = req_deadline();
	struct sbuf req = { 0 }, out = { 0 };
	struct conn *c;
	char *head = NULL, *v;
	size_t blen = body ? strlen(body) : 0;
	int r, why;

	memset(resp, 0, sizeof(*resp));
	c = conn_open(deadline, &why);
	if (!c)
		return why;
	request_head(&req, method, path, blen, idem);
	sb_puts(&req, "\r\n");
	if (blen)
		sb_add(&req, body, blen);
	r = conn_write(c, req.d, req.len, deadline);
	sb_free(&req);
	if (r)
		goto out;
	do {
		free(head);
		head = NULL;
		r = conn_read_head(c, &head, deadline);
		if (r)
			goto out;
		resp->status = head_status(head);
		if (resp->status < 0) {
			set_err("not an HTTP response from %s:%s", o.host, o.port);
			r = E_PROTO;
			goto out;
		}
	} while (resp->status < 200);   /* 1xx interim answers */

	sb_add(&out, "", 0);
	if (!strcmp(method, "HEAD") || resp->status == 204 || resp->status == 304) {
		/* no body */
	} else if ((v = head_get(head, "transfer-encoding")) && strcasestr(v, "chunked")) {
		free(v);
		r = read_chunked(c, &out, deadline);
		if (r)
			goto out;
	} else {
		free(v);
		v = head_get(head, "content-length");
		if (v) {
			char *end;
			unsigned long long n;

			int bad;

			errno = 0;
			n = strtoull(v, &end, 10);
			bad = errno || *end || end == v || !isdigit((unsigned char)*v);
			free(v);
			if (bad) {
				set_err("bad Content-Length from the hub");
				r = E_PROTO;
				goto out;
			}
			if (n > CTL_BODY_MAX) {
				set_err("the hub's response is over %u bytes", CTL_BODY_MAX);
				r = E_BIG;
				goto out;
			}
			out.d = xrealloc(out.d, (size_t)n + 1);
			out.cap = (size_t)n + 1;
			{
				long k = conn_read(c, out.d, (size_t)n, deadline, 0);

				if (k < 0) {
					r = (int)k;
					goto out;
				}
			}
			out.len = (size_t)n;
			out.d[out.len] = '\0';
		} else {
			/* until the hub closes */
			char tmp[16384];

			for (;;) {
				long k = conn_read(c, tmp, sizeof(tmp), deadline, 1);

				if (k < 0) {
					r = (int)k;
					goto out;
				}
				if (!k)
					break;
				if (out.len + (size_t)k > CTL_BODY_MAX) {
					set_err("the hub's response is over %u bytes",
						CTL_BODY_MAX);
					r = E_BIG;
					goto out;
				}
				sb_add(&out, tmp, (size_t)k);
			}
		}
	}
	resp->body = out.d;
	resp->len = out.len;
	out.d = NULL;
	r = 0;
out:
	if (r == E_TIMEOUT)
		set_err("no answer from %s:%s in time", o.host, o.port);
	free(head);
	sb_free(&out);
	conn_close(c);
	return r;
}

/* ------------------------------------------------------------------------ */
/* output helpers                                                             */

static void
fmt_ms(int64_t ms, int full, char *out, size_t n)
{
	time_t s = (time_t)(ms / 1000);
	struct tm tm;
	char t[24];

	if (ms <= 0 || !localtime_r(&s, &tm)) {
		snprintf(out, n, "-");
		return;
	}
	strftime(t, sizeof(t), full ? "%Y-%m-%d %H:%M:%S" : "%H:%M:%S", &tm);
	snprintf(out, n, "%.19s.%03d", t, (int)(ms % 1000));
}

static int64_t
jint(json_t *obj, const char *k)
{
	json_t *v = json_object_get(obj, k);

	if (json_is_integer(v))
		return (int64_t)json_integer_value(v);
	if (json_is_real(v))
		return (int64_t)json_real_value(v);
	return 0;
}

static const char *
jstr(json_t *obj, const char *k)
{
	const char *s = json_string_value(json_object_get(obj, k));

	return s ? s : "";
}

/* compact JSON of v ("null" when absent); caller frees */
static char *
jdump(json_t *v)
{
	char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;

	return s ? s : strdup("null");
}

static void
print_json_line(json_t *v)
{
	char *s = jdump(v);

	fputs(s, stdout);
	fputc('\n', stdout);
	fflush(stdout);
	free(s);
}

static const char *
net_what(int r)
{
	switch (r) {
	case E_TIMEOUT: return "timeout";
	case E_INTR: return "interrupted";
	case E_PROTO: return "protocol";
	case E_BIG: return "too_large";
	default: return "unreachable";
	}
}

/* a transport failure: message, --json document, exit code */
static int
report_net(int r)
{
	if (r == E_INTR) {
		fprintf(stderr, "hubctl: interrupted\n");
		return EX_INTERRUPTED;
	}
	fprintf(stderr, "hubctl: %s\n", g_err[0] ? g_err : "the hub is unreachable");
	if (o.json) {
		json_t *e = json_pack("{s:{s:s,s:s}}", "error", "code", net_what(r),
				      "message", g_err);

		print_json_line(e);
		json_decref(e);
	}
	return EX_UNREACHABLE;
}

/* an HTTP answer >= 300: the hub's error, --json document, exit code */
static int
report_http_error(const struct http_resp *rs)
{
	json_t *doc = rs->body ? json_loadb(rs->body, rs->len, 0, NULL) : NULL;
	json_t *err = json_object_get(doc, "error");
	const char *code = json_string_value(json_object_get(err, "code"));
	const char *msg = json_string_value(json_object_get(err, "message"));
	const char *field = json_string_value(json_object_get(err, "field"));

	if (err) {
		fprintf(stderr, "hubctl: %d %s: %s%s%s%s\n", rs->status,
			code ? code : "error", msg ? msg : "",
			field ? " (field: " : "", field ? field : "", field ? ")" : "");
	} else {
		size_t n = rs->len > 200 ? 200 : rs->len;
		size_t i;
		char snip[201];

		for (i = 0; i < n; i++)
			snip[i] = isprint((unsigned char)rs->body[i]) ? rs->body[i] : ' ';
		snip[n] = '\0';
		fprintf(stderr, "hubctl: HTTP %d from the hub%s%s\n", rs->status,
			n ? ": " : "", snip);
	}
	if (o.json) {
		json_t *e = json_object();

		json_object_set_new(e, "status", json_integer(rs->status));
		if (err) {
			json_object_set(e, "error", err);
		} else {
			json_object_set_new(e, "error", json_pack("{s:s,s:s}", "code",
				rs->status >= 500 ? "server_error" : "http_error",
				"message", "no JSON error body"));
		}
		print_json_line(e);
		json_decref(e);
	}
	json_decref(doc);
	return rs->status >= 500 || rs->status < 400 ? EX_UNREACHABLE : EX_HTTP_4XX;
}

/*
 * A JSON API call. Returns EX_OK with *out (caller decrefs) and *status, or
 * the exit code after reporting the failure.
 */
static int
api(const char *method, const char *path, const char *body, const char *idem,
    json_t **out, int *status)
{
	struct http_resp rs;
	json_error_t je;
	int r, ex;

	*out = NULL;
	g_err[0] = '\0';
	if (o.verbose)
		fprintf(stderr, "hubctl: %s %s%s\n", method, o.prefix, path);
	r = http_request(method, path, body, idem, &rs);
	if (r)
		return report_net(r);
	if (status)
		*status = rs.status;
	if (rs.status < 200 || rs.status >= 300) {
		ex = report_http_error(&rs);
		free(rs.body);
		return ex;
	}
	*out = json_loadb(rs.body ? rs.body : "", rs.len, 0, &je);
	free(rs.body);
	if (!*out) {
		set_err("the hub answered %s %s with invalid JSON: %s", method, path,
			je.text);
		return report_net(E_PROTO);
	}
	return EX_OK;
}

/*
 * POSTs body (taken) to path, to create what ("command", "rollout"): EX_OK
 * with *doc (caller decrefs; it has a string "id") and *status (may be
 * NULL), or the exit code after reporting the failure.
 */
static int
create(const char *path, json_t *body, const char *idem, const char *what,
       json_t **doc, int *status)
{
	char *bs = json_dumps(body, JSON_COMPACT);
	int ex;

	json_decref(body);
	ex = api("POST", path, bs, idem, doc, status);
	free(bs);
	if (ex)
		return ex;
	if (!json_is_string(json_object_get(*doc, "id"))) {
		fprintf(stderr, "hubctl: the hub's answer has no %s id\n", what);
		json_decref(*doc);
		*doc = NULL;
		return EX_UNREACHABLE;
	}
	return EX_OK;
}

/*
 * GET /v1/commands/{id} (a command, or a rollout: r_...), or with cancel
 * POST /v1/commands/{id}/cancel. As api(): EX_OK with *out, or the exit code.
 */
static int
command_api(const char *id, int cancel, json_t **out)
{
	struct sbuf p = { 0 };
	int ex;

	sb_puts(&p, "/v1/commands/");
	sb_urlenc(&p, id);
	if (cancel)
		sb_puts(&p, "/cancel");
	ex = api(cancel ? "POST" : "GET", p.d, cancel ? "{}" : NULL, NULL, out, NULL);
	sb_free(&p);
	return ex;
}

static int
fetch_command(const char *id, json_t **out)
{
	return command_api(id, 0, out);
}

/* "/v1/devices/{device}/commands" */
static void
sb_device_commands(struct sbuf *p, const char *device)
{
	sb_puts(p, "/v1/devices/");
	sb_urlenc(p, device);
	sb_puts(p, "/commands");
}

/* ------------------------------------------------------------------------ */
/* WebSocket client (RFC 6455, text frames, client side)                      */

struct ws {
	struct conn *c;
	int close_code;
};

static int
ws_send_frame(struct ws *w, int opcode, const char *p, size_t n, int64_t deadline)
{
	unsigned char hdr[14], mask[4];
	size_t hl = 0, i;
	char *buf;
	int r;

	hdr[hl++] = (unsigned char)(0x80 | opcode);
	if (n < 126) {
		hdr[hl++] = (unsigned char)(0x80 | n);
	} else if (n < 65536) {
		hdr[hl++] = 0x80 | 126;
		hdr[hl++] = (unsigned char)(n >> 8);
		hdr[hl++] = (unsigned char)n;
	} else {
		hdr[hl++] = 0x80 | 127;
		for (i = 0; i < 8; i++)
			hdr[hl++] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
	}
	if (RAND_bytes(mask, 4) != 1)
		for (i = 0; i < 4; i++)
			mask[i] = (unsigned char)rand();
	memcpy(hdr + hl, mask, 4);
	hl += 4;
	buf = xmalloc(hl + n);
	memcpy(buf, hdr, hl);
	for (i = 0; i < n; i++)
		buf[hl + i] = (char)(p[i] ^ mask[i & 3]);
	r = conn_write(w->c, buf, hl + n, deadline);
	free(buf);
	return r;
}

static int
ws_send_json(struct ws *w, json_t *msg, int64_t deadline)
{
	char *s = json_dumps(msg, JSON_COMPACT);
	int r;

	if (!s)
		return E_PROTO;
	r = ws_send_frame(w, 1, s, strlen(s), deadline);
	free(s);
	return r;
}

static void
ws_close(struct ws *w)
{
	if (!w)
		return;
	if (w->c) {
		unsigned char code[2] = { 1000 >> 8, 1000 & 255 };

		ws_send_frame(w, 8, (const char *)code, 2, mono_ms() + 500);
		conn_close(w->c);
	}
	free(w);
}

/*
 * Upgrades GET <path> to a WebSocket with header auth. Returns the ws, or
 * NULL with *status = the HTTP status (> 0, *err_body its body) or E_*.
 */
static struct ws *
ws_open(const char *path, int *status, char **err_body)
{
	int64_t deadline = req_deadline();
	unsigned char rnd[16], dig[EVP_MAX_MD_SIZE];
	char key[32], want[64], cat[128];
	unsigned dlen = 0;
	struct sbuf req = { 0 };
	struct conn *c;
	char *head = NULL, *v;
	int r, why;

	*status = 0;
	*err_body = NULL;
	c = conn_open(deadline, &why);
	if (!c) {
		*status = why;
		return NULL;
	}
	if (RAND_bytes(rnd, sizeof(rnd)) != 1)
		for (r = 0; r < 16; r++)
			rnd[r] = (unsigned char)rand();
	EVP_EncodeBlock((unsigned char *)key, rnd, sizeof(rnd));
	snprintf(cat, sizeof(cat), "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
	EVP_Digest(cat, strlen(cat), dig, &dlen, EVP_sha1(), NULL);
	EVP_EncodeBlock((unsigned char *)want, dig, (int)dlen);

	sb_printf(&req, "GET %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: hubctl\r\n"
		  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
		  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
		  "Sec-WebSocket-Protocol: " CTL_SUBPROTOCOL "\r\n", o.prefix, path,
		  o.host_hdr, key);
	if (o.key)
		sb_printf(&req, "Authorization: Bearer %s\r\n", o.key);
	sb_puts(&req, "\r\n");
	r = conn_write(c, req.d, req.len, deadline);
	sb_free(&req);
	if (r)
		goto fail;
	r = conn_read_head(c, &head, deadline);
	if (r)
		goto fail;
	*status = head_status(head);
	if (*status != 101) {
		if (*status < 0) {
			set_err("not an HTTP response from %s:%s", o.host, o.port);
			r = E_PROTO;
			goto fail;
		}
		/* the error body, if it says how long it is */
		v = head_get(head, "content-length");
		if (v) {
			unsigned long n = strtoul(v, NULL, 10);

			free(v);
			if (n && n < 65536) {
				char *b = xmalloc(n + 1);
				long k = conn_read(c, b, n, deadline, 1);

				if (k > 0) {
					b[k] = '\0';
					*err_body = b;
				} else {
					free(b);
				}
			}
		}
		free(head);
		conn_close(c);
		return NULL;
	}
	v = head_get(head, "sec-websocket-accept");
	if (!v || strcmp(v, want)) {
		free(v);
		set_err("the hub's WebSocket upgrade has a wrong Sec-WebSocket-Accept");
		r = E_PROTO;
		goto fail;
	}
	free(v);
	free(head);
	{
		struct ws *w = xmalloc(sizeof(*w));

		w->c = c;
		w->close_code = 0;
		return w;
	}
fail:
	if (r == E_TIMEOUT)
		set_err("the WebSocket upgrade at %s:%s timed out", o.host, o.port);
	*status = r;
	free(head);
	conn_close(c);
	return NULL;
}

/*
 * Next text message: 1 with *msg (caller frees), 0 when the hub closed
 * (w->close_code), or E_*. Pings are answered; binary messages skipped.
 */
static int
ws_recv(struct ws *w, char **msg, size_t *len, int64_t deadline)
{
	struct sbuf m = { 0 };
	int opcode_msg = -1;

	*msg = NULL;
	for (;;) {
		unsigned char h[2], ext[8], mk[4];
		uint64_t n;
		int fin, op, masked;
		long r;
		char *p;
		size_t i;

		r = conn_read(w->c, (char *)h, 2, deadline, 1);
		if (r == 0 || r == 1) {
			w->close_code = 1006;
			sb_free(&m);
			return 0;
		}
		if (r < 0)
			goto err;
		fin = h[0] & 0x80;
		op = h[0] & 0x0f;
		masked = h[1] & 0x80;
		n = h[1] & 0x7f;
		if (n == 126) {
			if ((r = conn_read(w->c, (char *)ext, 2, deadline, 0)) < 0)
				goto err;
			n = ((uint64_t)ext[0] << 8) | ext[1];
		} else if (n == 127) {
			if ((r = conn_read(w->c, (char *)ext, 8, deadline, 0)) < 0)
				goto err;
			n = 0;
			for (i = 0; i < 8; i++)
				n = (n << 8) | ext[i];
		}
		if (masked && (r = conn_read(w->c, (char *)mk, 4, deadline, 0)) < 0)
			goto err;
		if (n > CTL_WS_MSG_MAX || m.len + n > CTL_WS_MSG_MAX) {
			set_err("a stream message is over %u bytes", CTL_WS_MSG_MAX);
			r = E_BIG;
			goto err;
		}
		p = xmalloc((size_t)n + 1);
		if (n && (r = conn_read(w->c, p, (size_t)n, deadline, 0)) < 0) {
			free(p);
			goto err;
		}
		if (masked)
			for (i = 0; i < n; i++)
				p[i] ^= (char)mk[i & 3];
		if (op == 8) {          /* close: echo it */
			w->close_code = n >= 2 ? ((unsigned char)p[0] << 8) |
						 (unsigned char)p[1] : 1005;
			ws_send_frame(w, 8, p, n >= 2 ? 2 : 0, mono_ms() + 500);
			free(p);
			sb_free(&m);
			return 0;
		}
		if (op == 9) {          /* ping */
			ws_send_frame(w, 10, p, (size_t)n, deadline ? deadline :
				      mono_ms() + 5000);
			free(p);
			continue;
		}
		if (op == 10) {         /* pong */
			free(p);
			continue;
		}
		if (op == 1 || op == 2)
			opcode_msg = op;
		else if (op != 0) {
			free(p);
			set_err("unknown WebSocket opcode %d from the hub", op);
			r = E_PROTO;
			goto err;
		}
		sb_add(&m, p, (size_t)n);
		free(p);
		if (!fin)
			continue;
		if (opcode_msg != 1) {  /* binary: not ours */
			sb_free(&m);
			opcode_msg = -1;
			continue;
		}
		if (!m.d)
			sb_add(&m, "", 0);
		*msg = m.d;
		*len = m.len;
		return 1;
err:
		sb_free(&m);
		return (int)r;
	}
}

/* ------------------------------------------------------------------------ */
/* stream subscriptions                                                       */

/* a transport failure r of the stream: reported (unless quiet); the exit code */
static int
stream_net_fail(int r, int quiet)
{
	if (!quiet)
		return report_net(r);
	return r == E_INTR ? EX_INTERRUPTED : EX_UNREACHABLE;
}

/*
 * Opens /v1/stream and subscribes. Returns the ws, or NULL with the exit
 * code in *ex (reported unless quiet).
 */
static struct ws *
stream_subscribe(json_t *sub, int quiet, int *ex)
{
	int64_t deadline = req_deadline();
	char *body = NULL, *msg;
	size_t len;
	struct ws *w;
	int st, r;

	*ex = EX_OK;
	g_err[0] = '\0';
	w = ws_open("/v1/stream", &st, &body);
	if (!w) {
		if (st > 0) {
			struct http_resp rs = { .status = st, .body = body,
						.len = body ? strlen(body) : 0 };

			if (quiet) {
				set_err("the stream upgrade got HTTP %d", st);
				*ex = st >= 500 ? EX_UNREACHABLE : EX_HTTP_4XX;
			} else {
				*ex = report_http_error(&rs);
			}
		} else {
			*ex = stream_net_fail(st, quiet);
		}
		free(body);
		return NULL;
	}
	if ((r = ws_send_json(w, sub, deadline)))
		goto net;
	for (;;) {
		json_t *m;
		const char *type;

		r = ws_recv(w, &msg, &len, deadline);
		if (r == 0) {
			set_err("the hub closed the stream (code %d)", w->close_code);
			r = E_NET;
			goto net;
		}
		if (r < 0) {
			if (r == E_TIMEOUT)
				set_err("no answer to subscribe in time");
			goto net;
		}
		m = json_loadb(msg, len, 0, NULL);
		free(msg);
		type = jstr(m, "type");
		if (!strcmp(type, "subscribed")) {
			json_decref(m);
			return w;
		}
		if (!strcmp(type, "error")) {
			const char *code = jstr(m, "code");

			*ex = !strcmp(code, "unavailable") ? EX_UNREACHABLE : EX_HTTP_4XX;
			if (quiet) {
				set_err("subscribe failed: %s: %s", code, jstr(m, "message"));
			} else {
				fprintf(stderr, "hubctl: stream error %s: %s\n", code,
					jstr(m, "message"));
				if (o.json)
					print_json_line(m);
			}
			json_decref(m);
			ws_close(w);
			return NULL;
		}
		json_decref(m);   /* anything else before subscribed: ignore */
	}
net:
	*ex = stream_net_fail(r, quiet);
	ws_close(w);
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* argument helpers                                                           */

/*
 * If argv[*i] is --name or --name=value: 1 and *val set (the next argument
 * for --name, which must exist); else 0.
 */
static int
opt_val(char **argv, int argc, int *i, const char *name, const char **val)
{
	const char *a = argv[*i];
	size_t n = strlen(name);

	if (strncmp(a, "--", 2) || strncmp(a + 2, name, n))
		return 0;
	if (a[2 + n] == '=') {
		*val = a + 3 + n;
		return 1;
	}
	if (a[2 + n])
		return 0;
	if (*i + 1 >= argc)
		die_usage("--%s needs a value", name);
	*val = argv[++*i];
	return 1;
}

static int
opt_flag(const char *a, const char *name)
{
	return !strncmp(a, "--", 2) && !strcmp(a + 2, name);
}

static long long
parse_int(const char *flag, const char *s, long long min, long long max)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (!*s || *end || errno || v < min || v > max)
		die_usage("%s: expected an integer from %lld to %lld, got '%s'", flag,
			  min, max, s);
	return v;
}

static double
parse_secs(const char *flag, const char *s)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (!*s || *end || errno || !(v > 0) || v > 1e7)
		die_usage("%s: expected seconds > 0, got '%s'", flag, s);
	return v;
}

/* k=v into a labels object; usage error otherwise */
static void
add_label(json_t *labels, const char *kv)
{
	const char *eq = strchr(kv, '=');

	if (!eq || eq == kv)
		die_usage("--label: expected k=v, got '%s'", kv);
	{
		char *k = xstrndup(kv, (size_t)(eq - kv));
		json_t *v = json_string(eq + 1);

		if (!v || json_object_set_new(labels, k, v))
			die_usage("--label: not valid UTF-8: '%s'", kv);
		free(k);
	}
}

static char *
read_small_file(const char *flag, const char *path, size_t max)
{
	FILE *f = fopen(path, "rb");
	char *b;
	size_t n;

	if (!f)
		die_usage("%s %s: %s", flag, path, strerror(errno));
	b = xmalloc(max + 2);
	n = fread(b, 1, max + 1, f);
	fclose(f);
	if (n > max) {
		free(b);
		die_usage("%s %s: over %zu bytes", flag, path, max);
	}
	b[n] = '\0';
	return b;
}

/*
 * If argv[*i] is --name N: 1 and obj[field] set to N (0 to INT64_MAX/2; the
 * hub checks the real range and answers 422 naming the field); else 0.
 */
static int
int_field_opt(char **argv, int argc, int *i, const char *name, json_t *obj,
	      const char *field)
{
	const char *v;
	char flag[64];

	if (!opt_val(argv, argc, i, name, &v))
		return 0;
	snprintf(flag, sizeof(flag), "--%s", name);
	json_object_set_new(obj, field, json_integer(parse_int(flag, v, 0,
							       INT64_MAX / 2)));
	return 1;
}

/*
 * A command's limits, as send and send-fleet take them: --ack-timeout,
 * --timeout (the command's timeout_s, not the global one), --ttl,
 * --max-attempts into body. 1 if argv[*i] was one of them; else 0.
 */
static int
limit_opt(char **argv, int argc, int *i, json_t *body)
{
	return int_field_opt(argv, argc, i, "ack-timeout", body, "ack_timeout_s") ||
	       int_field_opt(argv, argc, i, "timeout", body, "timeout_s") ||
	       int_field_opt(argv, argc, i, "ttl", body, "ttl_s") ||
	       int_field_opt(argv, argc, i, "max-attempts", body, "max_attempts");
}

/* --params JSON or --params @FILE: the parsed value (caller owns it); a usage
 * error when over CTL_PARAMS_MAX or not JSON */
static json_t *
parse_params(const char *params)
{
	json_error_t je;
	char *text = NULL;
	json_t *pj;

	if (params[0] == '@')
		text = read_small_file("--params", params + 1, CTL_PARAMS_MAX);
	else if (strlen(params) > CTL_PARAMS_MAX)
		die_usage("--params: over %u bytes", CTL_PARAMS_MAX);
	pj = json_loads(text ? text : params, JSON_DECODE_ANY, &je);
	free(text);
	if (!pj)
		die_usage("--params: not JSON: %s (line %d, column %d)", je.text,
			  je.line, je.column);
	return pj;
}

/*
 * a, a positional argument of cmd, into the first empty one of slots[0..n-1];
 * a usage error when a is an unknown option or one argument too many
 */
static void
take_positional(const char *cmd, const char *a, const char **slots, int n)
{
	if (a[0] == '-' && a[1])
		die_usage("%s: unknown option '%s'", cmd, a);
	for (int k = 0; k < n; k++) {
		if (!slots[k]) {
			slots[k] = a;
			return;
		}
	}
	die_usage("%s: unexpected argument '%s'", cmd, a);
}

static int
global_opt(char **argv, int argc, int *i)
{
	const char *v;

	if (opt_val(argv, argc, i, "url", &v)) {
		o.url = v;
	} else if (opt_val(argv, argc, i, "key", &v)) {
		free(o.key);
		o.key = strdup(v);
	} else if (opt_val(argv, argc, i, "key-file", &v)) {
		char *k = read_small_file("--key-file", v, CTL_KEY_MAX), *e;

		e = k + strcspn(k, "\r\n");
		*e = '\0';
		free(o.key);
		o.key = k;
	} else if (opt_val(argv, argc, i, "cafile", &v)) {
		o.cafile = v;
	} else if (opt_flag(argv[*i], "insecure")) {
		o.insecure = 1;
	} else if (opt_flag(argv[*i], "json")) {
		o.json = 1;
	} else if (opt_flag(argv[*i], "verbose") || !strcmp(argv[*i], "-v")) {
		o.verbose = 1;
	} else {
		return 0;
	}
	return 1;
}

static void
parse_url(void)
{
	const char *u = o.url, *p, *hs, *he, *ps = NULL, *path;

	if (!strncmp(u, "http://", 7) || !strncmp(u, "ws://", 5)) {
		o.tls = 0;
		p = u + (u[0] == 'h' ? 7 : 5);
	} else if (!strncmp(u, "https://", 8) || !strncmp(u, "wss://", 6)) {
		o.tls = 1;
		p = u + (u[0] == 'h' ? 8 : 6);
	} else {
		die_usage("--url: expected http://HOST:PORT or https://HOST:PORT, got '%s'",
			  u);
	}
	path = p + strcspn(p, "/?#");
	if (*p == '[') {
		hs = p + 1;
		he = memchr(hs, ']', (size_t)(path - hs));
		if (!he)
			die_usage("--url: unterminated [IPv6] literal in '%s'", u);
		if (he[1] == ':')
			ps = he + 2;
		else if (he + 1 != path)
			die_usage("--url: bad host in '%s'", u);
	} else {
		hs = p;
		he = memchr(p, ':', (size_t)(path - p));
		if (he)
			ps = he + 1;
		else
			he = path;
	}
	if (he == hs)
		die_usage("--url: no host in '%s'", u);
	o.host = xstrndup(hs, (size_t)(he - hs));
	if (ps) {
		char *pt = xstrndup(ps, (size_t)(path - ps));

		parse_int("--url port", pt, 1, 65535);
		o.port = pt;
	} else {
		o.port = strdup(o.tls ? "443" : "80");
	}
	{
		struct sbuf h = { 0 };

		if (strchr(o.host, ':'))
			sb_printf(&h, "[%s]", o.host);
		else
			sb_puts(&h, o.host);
		if (ps)
			sb_printf(&h, ":%s", o.port);
		o.host_hdr = h.d;
	}
	if (*path == '?' || *path == '#')
		die_usage("--url: no query or fragment, please: '%s'", u);
	{
		size_t n = strlen(path);

		while (n && path[n - 1] == '/')
			n--;
		o.prefix = xstrndup(path, n);
	}
	for (const char *q = o.prefix; *q; q++)
		if ((unsigned char)*q <= ' ' || *q == 0x7f)
			die_usage("--url: spaces or control characters in the path");
	for (const char *q = o.host; *q; q++)
		if ((unsigned char)*q <= ' ' || *q == 0x7f || *q == '/')
			die_usage("--url: bad host");
}

static void
check_key(void)
{
	if (!o.key)
		return;
	if (!*o.key)
		die_usage("the API key is empty");
	for (const char *p = o.key; *p; p++)
		if ((unsigned char)*p <= ' ' || *p == 0x7f)
			die_usage("the API key contains spaces or control characters");
}

/* ------------------------------------------------------------------------ */
/* commands: formatting                                                       */

static const char *const FINAL_STATES[] = {
	"succeeded", "failed", "rejected", "timed_out", "expired", "canceled", NULL
};

static int
is_final(const char *st)
{
	for (int i = 0; FINAL_STATES[i]; i++)
		if (!strcmp(st, FINAL_STATES[i]))
			return 1;
	return 0;
}

static int
state_rank(const char *st)
{
	if (!strcmp(st, "queued"))
		return 0;
	if (!strcmp(st, "sent"))
		return 1;
	if (!strcmp(st, "received"))
		return 2;
	if (!strcmp(st, "in_progress"))
		return 3;
	if (is_final(st))
		return 4;
	return -1;
}

static const char *const ALL_STATES[] = {
	"queued", "sent", "received", "in_progress", "succeeded", "failed",
	"rejected", "timed_out", "expired", "canceled", NULL
};

/* what follows the status in a transition line (send --wait, tail):
 * " (attempt N)" when sent, " P%", " message", ": error" */
static void
print_status_details(json_t *ev)
{
	json_t *pr = json_object_get(ev, "progress");
	const char *msg = json_string_value(json_object_get(ev, "message"));
	const char *err = json_string_value(json_object_get(ev, "error"));

	if (!strcmp(jstr(ev, "status"), "sent"))
		printf(" (attempt %" PRId64 ")", jint(ev, "attempt"));
	if (json_is_number(pr))
		printf(" %" PRId64 "%%", jint(ev, "progress"));
	if (msg)
		printf(" %s", msg);
	if (err)
		printf(": %s", err);
}

/* lead and a command's result as JSON, when it has one */
static void
print_result(json_t *c, const char *lead)
{
	json_t *res = json_object_get(c, "result");

	if (res && !json_is_null(res)) {
		char *s = jdump(res);

		printf("%s%s", lead, s);
		free(s);
	}
}

/* one transition line (human): "HH:MM:SS.mmm status details" */
static void
print_transition_human(json_t *ev)
{
	char t[32];

	fmt_ms(jint(ev, "at"), 0, t, sizeof(t));
	printf("%s  %s", t, jstr(ev, "status"));
	print_status_details(ev);
	print_result(ev, " ");
	putchar('\n');
	fflush(stdout);
}

/* the "created" and "updated" lines of show (a command or a rollout) */
static void
print_stamps(json_t *v)
{
	char t[40];

	fmt_ms(jint(v, "created_at"), 1, t, sizeof(t));
	printf("  created   %s\n", t);
	fmt_ms(jint(v, "updated_at"), 1, t, sizeof(t));
	printf("  updated   %s\n", t);
}

static void
print_command_human(json_t *c, int with_history)
{
	static const char *const fields[] = { "params", "progress", "message",
					       "result", "error", NULL };
	json_t *h = json_object_get(c, "history");
	char t[40];
	int i;

	printf("%s  %s on %s (%s)\n", jstr(c, "id"), jstr(c, "name"), jstr(c, "device"),
	       jstr(c, "device_type"));
	printf("  status    %s (attempt %" PRId64 "/%" PRId64 ")\n", jstr(c, "status"),
	       jint(c, "attempt"), jint(c, "max_attempts"));
	for (i = 0; fields[i]; i++) {
		json_t *v = json_object_get(c, fields[i]);

		if (v && !json_is_null(v) &&
		    !(json_is_object(v) && !json_object_size(v))) {
			char *s = json_is_string(v) ? strdup(json_string_value(v)) : jdump(v);

			printf("  %-9s %s\n", fields[i], s ? s : "");
			free(s);
		}
	}
	print_stamps(c);
	printf("  limits    ack_timeout %" PRId64 "s, timeout %" PRId64 "s, ttl %"
	       PRId64 "s\n", jint(c, "ack_timeout_s"), jint(c, "timeout_s"),
	       jint(c, "ttl_s"));
	if (with_history && json_is_array(h)) {
		size_t k;
		json_t *e;

		printf("  history\n");
		json_array_foreach(h, k, e) {
			json_t *ap = json_object_get(e, "applied");

			printf("    ");
			if (json_is_false(ap)) {
				fmt_ms(jint(e, "at"), 0, t, sizeof(t));
				printf("%s  (%s, not applied)\n", t, jstr(e, "status"));
			} else {
				print_transition_human(e);
			}
		}
	}
	fflush(stdout);
}

static int
final_exit(const char *st)
{
	return !strcmp(st, "succeeded") ? EX_OK : EX_CMD_FAILED;
}

/* ------------------------------------------------------------------------ */
/* send                                                                       */

struct tracker {
	char *id;
	json_t *cmd;        /* the latest command document (borrowed into events) */
	char status[32];
	int rank;
	int64_t attempt;
	int64_t progress;   /* -1 none */
	int64_t last_at;
	int final;
};

/* prints ev if it moves the command forward (or updates progress/attempt) */
static void
track_event(struct tracker *t, json_t *ev)
{
	const char *st = jstr(ev, "status");
	int rank = state_rank(st);
	int64_t att = jint(ev, "attempt");
	json_t *pv = json_object_get(ev, "progress");
	int64_t pr = json_is_number(pv) ? jint(ev, "progress") : -1;
	int show;

	if (rank < 0 || t->final)
		return;
	if (rank > t->rank)
		show = 1;
	else if (rank < t->rank)
		show = 0;
	else if (!strcmp(st, "sent"))
		show = att > t->attempt;
	else if (!strcmp(st, "in_progress"))
		show = pr >= 0 && pr != t->progress;
	else
		show = 0;
	if (!show)
		return;
	snprintf(t->status, sizeof(t->status), "%s", st);
	t->rank = rank;
	if (att > t->attempt)
		t->attempt = att;
	if (pr >= 0)
		t->progress = pr;
	if (jint(ev, "at") > t->last_at)
		t->last_at = jint(ev, "at");
	t->final = is_final(st);
	if (o.json) {
		json_t *copy = json_deep_copy(ev);

		json_object_del(copy, "sub");
		json_object_del(copy, "applied");
		if (!json_object_get(copy, "type"))
			json_object_set_new(copy, "type", json_string("command_status"));
		print_json_line(copy);
		json_decref(copy);
	} else {
		print_transition_human(ev);
	}
}

/* a command_status event of command c, so far without its status */
static json_t *
status_event(json_t *c)
{
	return json_pack("{s:s,s:s,s:s,s:s}", "type", "command_status", "id",
			 jstr(c, "id"), "device", jstr(c, "device"), "name",
			 jstr(c, "name"));
}

/* an event from a history entry of command c */
static json_t *
event_from_history(json_t *c, json_t *h)
{
	json_t *ev = status_event(c);
	const char *k;
	json_t *v;

	json_object_foreach(h, k, v)
		if (strcmp(k, "applied"))
			json_object_set(ev, k, v);
	if (!json_object_get(ev, "attempt"))
		json_object_set_new(ev, "attempt", json_integer(jint(c, "attempt")));
	return ev;
}

/* applies a fetched command: its history entries after what was shown */
static void
track_command(struct tracker *t, json_t *c)
{
	json_t *h = json_object_get(c, "history");
	size_t i;
	json_t *e;

	if (json_is_array(h)) {
		json_array_foreach(h, i, e) {
			json_t *ev;

			if (json_is_false(json_object_get(e, "applied")))
				continue;
			if (jint(e, "at") < t->last_at)
				continue;
			ev = event_from_history(c, e);
			track_event(t, ev);
			json_decref(ev);
		}
	}
	/* the current state, whatever the history showed */
	{
		json_t *ev = status_event(c);

		json_object_set_new(ev, "status", json_string(jstr(c, "status")));
		json_object_set_new(ev, "at", json_integer(jint(c, "updated_at")));
		json_object_set_new(ev, "attempt", json_integer(jint(c, "attempt")));
		if (json_is_number(json_object_get(c, "progress")))
			json_object_set(ev, "progress", json_object_get(c, "progress"));
		track_event(t, ev);
		json_decref(ev);
	}
}

/* fetches the command and shows what it has that was not shown; 0 or the
 * exit code */
static int
catch_up(struct tracker *t)
{
	json_t *c;
	int ex = fetch_command(t->id, &c);

	if (ex)
		return ex;
	track_command(t, c);
	json_decref(c);
	return EX_OK;
}

/* the end of --wait: the final command, printed; exit by its status */
static int
finish_wait(struct tracker *t)
{
	json_t *c;
	int ex = fetch_command(t->id, &c);

	if (ex)
		return ex;
	track_command(t, c);   /* in case the stream missed the last step */
	if (o.json) {
		print_json_line(c);
	} else {
		const char *err = json_string_value(json_object_get(c, "error"));

		printf("%s %s", jstr(c, "id"), jstr(c, "status"));
		if (err)
			printf(": %s", err);
		print_result(c, " result ");
		putchar('\n');
	}
	ex = is_final(jstr(c, "status")) ? final_exit(jstr(c, "status")) : EX_WAIT_TIMEOUT;
	json_decref(c);
	return ex;
}

/*
 * A --wait (send, send-fleet) that gives up at the --timeout deadline: a line
 * on stderr, "what id is status" and extra, and with --json the wait_timeout
 * document with message. Returns EX_WAIT_TIMEOUT.
 */
static int
wait_timed_out(const char *what, const char *id, const char *status,
	       const char *extra, const char *message)
{
	fflush(stdout);
	fprintf(stderr, "hubctl: gave up waiting after %.1fs: %s %s is %s%s\n",
		o.timeout, what, id, status, extra);
	if (o.json) {
		json_t *e = json_pack("{s:{s:s,s:s},s:s,s:s}", "error", "code",
				      "wait_timeout", "message", message, "id", id,
				      "status", status);

		print_json_line(e);
		json_decref(e);
	}
	return EX_WAIT_TIMEOUT;
}

/* a --wait stopped by Ctrl-C: says where it was; EX_INTERRUPTED */
static int
wait_interrupted(const char *what, const char *id, const char *status,
		 const char *extra)
{
	fflush(stdout);
	fprintf(stderr, "hubctl: interrupted; %s %s is %s%s\n", what, id, status,
		extra);
	return EX_INTERRUPTED;
}

static int follow_loop(struct tracker *t, struct ws **wp);

/* follows the command until final (then prints it) or the deadline */
static int
follow(struct tracker *t, struct ws *w)
{
	int ex = follow_loop(t, &w);

	ws_close(w);
	return ex < 0 ? finish_wait(t) : ex;
}

/* -1 once final, else an exit code; *wp may be closed and set NULL */
static int
follow_loop(struct tracker *t, struct ws **wp)
{
	struct ws *w = *wp;
	int64_t next_poll = 0;
	int ex;

	while (!t->final) {
		int64_t now = mono_ms();

		if (g_interrupted)
			return wait_interrupted("command", t->id, t->status, "");
		if (g_deadline && now >= g_deadline)
			return wait_timed_out("command", t->id, t->status, "",
					      "the command did not reach a final "
					      "state in time");
		if (w) {
			char *msg;
			size_t len;
			int r = ws_recv(w, &msg, &len, until_deadline(now + 1000));

			if (r == E_TIMEOUT || r == E_INTR)
				continue;
			if (r <= 0) {
				fprintf(stderr, "hubctl: the status stream %s; polling "
					"instead\n", r == 0 ? "closed" : "failed");
				ws_close(w);
				w = *wp = NULL;
				next_poll = 0;
				continue;
			}
			{
				json_t *m = json_loadb(msg, len, 0, NULL);
				const char *type = jstr(m, "type");

				free(msg);
				if (!strcmp(type, "command_status") &&
				    !strcmp(jstr(m, "id"), t->id)) {
					track_event(t, m);
				} else if (!strcmp(type, "gap")) {
					/* events were lost: catch up from the command */
					ex = catch_up(t);
					if (ex) {
						json_decref(m);
						return ex;
					}
				}
				json_decref(m);
			}
			continue;
		}
		if (now < next_poll) {
			nap_until(next_poll);
			continue;
		}
		ex = catch_up(t);
		if (ex)
			return ex;
		next_poll = mono_ms() + CTL_POLL_INTERVAL;
	}
	return -1;
}

static int
cmd_send(int argc, char **argv, int i)
{
	const char *args[2] = { NULL, NULL }, *device, *name, *params = NULL;
	const char *idem = NULL, *v;
	json_t *body = json_object(), *doc = NULL;
	struct ws *w = NULL;
	struct sbuf path = { 0 };
	struct tracker t = { 0 };
	int wait = 0, ex, status = 0;

	for (; i < argc; i++) {
		if (opt_val(argv, argc, &i, "params", &v)) {
			params = v;
		} else if (limit_opt(argv, argc, &i, body)) {
			/* taken */
		} else if (opt_val(argv, argc, &i, "idempotency-key", &v)) {
			idem = v;
			for (const char *q = idem; *q; q++)
				if ((unsigned char)*q < 0x21 || *q == 0x7f)
					die_usage("--idempotency-key: printable characters "
						  "without spaces only");
		} else if (opt_flag(argv[i], "wait")) {
			wait = 1;
		} else if (global_opt(argv, argc, &i)) {
			/* taken */
		} else {
			take_positional("send", argv[i], args, 2);
		}
	}
	device = args[0];
	name = args[1];
	if (!device || !name)
		die_usage("send: expected DEVICE NAME");
	if (!*device || !*name)
		die_usage("send: DEVICE and NAME must not be empty");
	json_object_set_new(body, "name", json_string(name));
	if (!json_object_get(body, "name"))
		die_usage("send: NAME is not valid UTF-8");
	if (params)
		json_object_set_new(body, "params", parse_params(params));
	parse_url();
	check_key();

	if (wait) {
		/* subscribe before creating, so no transition can be missed */
		json_t *sub = json_pack("{s:s,s:s,s:s,s:{s:[s]}}", "type", "subscribe",
					"id", "hubctl-wait", "stream", "commands",
					"filter", "devices", device);

		w = stream_subscribe(sub, 1, &ex);
		json_decref(sub);
		if (!w) {
			if (ex == EX_INTERRUPTED)
				return ex;
			fprintf(stderr, "hubctl: no status stream (%s); polling the "
				"command instead\n", g_err[0] ? g_err : "unavailable");
		}
	}

	sb_device_commands(&path, device);
	ex = create(path.d, body, idem, "command", &doc, &status);
	sb_free(&path);
	if (ex) {
		ws_close(w);
		return ex;
	}
	if (o.json) {
		print_json_line(doc);
	} else if (!wait) {
		printf("%s %s%s\n", jstr(doc, "id"), jstr(doc, "status"),
		       status == 200 ? " (existing command: same Idempotency-Key)" : "");
	} else {
		printf("%s  %s on %s%s\n", jstr(doc, "id"), jstr(doc, "name"),
		       jstr(doc, "device"),
		       status == 200 ? " (existing command: same Idempotency-Key)" : "");
	}
	fflush(stdout);
	if (!wait) {
		json_decref(doc);
		return EX_OK;
	}

	t.id = strdup(jstr(doc, "id"));
	t.rank = -1;
	t.progress = -1;
	snprintf(t.status, sizeof(t.status), "%s", jstr(doc, "status"));
	if (json_is_array(json_object_get(doc, "history"))) {
		track_command(&t, doc);
		ex = EX_OK;
	} else {
		/* no history in the answer: the command's story from the hub */
		ex = catch_up(&t);
	}
	json_decref(doc);
	if (!ex)
		ex = follow(&t, w);
	else
		ws_close(w);
	free(t.id);
	return ex;
}

/* ------------------------------------------------------------------------ */
/* send-fleet, show-rollout                                                   */

#define CTL_FLEET_POLL_MS 1000     /* ms between GETs of a rollout (--wait) */

static const char *const FAILED_STATES[] = {
	"failed", "rejected", "timed_out", "expired", NULL
};

/* "succeeded 2, in_progress 1, queued 5": counts in lifecycle order (then
 * any state this hubctl does not know), zero counts left out */
static void
sb_counts(struct sbuf *b, json_t *counts, const char *sep)
{
	const char *k;
	json_t *v;
	int n = 0;

	for (int s = 0; ALL_STATES[s]; s++) {
		v = json_object_get(counts, ALL_STATES[s]);
		if (json_is_integer(v) && json_integer_value(v)) {
			sb_printf(b, "%s%s %" PRId64, n++ ? sep : "", ALL_STATES[s],
				  (int64_t)json_integer_value(v));
		}
	}
	json_object_foreach(counts, k, v) {
		int known = 0;

		for (int s = 0; ALL_STATES[s]; s++)
			known |= !strcmp(k, ALL_STATES[s]);
		if (!known && json_is_integer(v))
			sb_printf(b, "%s%s %" PRId64, n++ ? sep : "", k,
				  (int64_t)json_integer_value(v));
	}
	if (!n)
		sb_puts(b, "no commands");
}

/* "site=b1,floor=2" (or "-") */
static void
sb_labels(struct sbuf *b, json_t *labels)
{
	const char *k;
	json_t *v;
	int n = 0;

	json_object_foreach(labels, k, v)
		sb_printf(b, "%s%s=%s", n++ ? "," : "", k,
			  json_is_string(v) ? json_string_value(v) : "?");
	if (!n)
		sb_puts(b, "-");
}

static int64_t
count_of(json_t *r, const char *state)
{
	return jint(json_object_get(r, "counts"), state);
}

static int64_t
failures_of(json_t *r)
{
	int64_t n = 0;

	for (int s = 0; FAILED_STATES[s]; s++)
		n += count_of(r, FAILED_STATES[s]);
	return n;
}

/* 0: completed without failures; 1: aborted, or any failed/rejected/
 * timed_out/expired command */
static int
rollout_exit(json_t *r)
{
	return !strcmp(jstr(r, "status"), "completed") && !failures_of(r) ?
	       EX_OK : EX_CMD_FAILED;
}

/* the progress line (no newline): "HH:MM:SS  running  released 3/8  queued 5 ..." */
static char *
rollout_progress(json_t *r)
{
	struct sbuf b = { 0 };
	char t[32];

	fmt_ms(jint(r, "updated_at"), 0, t, sizeof(t));
	sb_printf(&b, "%s  %-9s released %" PRId64 "/%" PRId64 "  ", t,
		  jstr(r, "status"), jint(r, "released"), jint(r, "total"));
	sb_counts(&b, json_object_get(r, "counts"), "  ");
	return b.d;
}

static void
print_rollout_human(json_t *r)
{
	struct sbuf b = { 0 };
	json_t *params = json_object_get(r, "params");

	sb_labels(&b, json_object_get(r, "labels"));
	printf("%s  %s on %s devices (labels %s)\n", jstr(r, "id"), jstr(r, "name"),
	       jstr(r, "device_type"), b.d);
	sb_free(&b);
	printf("  status    %s\n", jstr(r, "status"));
	printf("  released  %" PRId64 "/%" PRId64 " at %" PRId64 "/min\n",
	       jint(r, "released"), jint(r, "total"), jint(r, "max_per_minute"));
	{
		json_t *ratio = json_object_get(r, "abort_failure_ratio");
		double q = json_is_number(ratio) ? json_number_value(ratio) : 1;

		if (q >= 1)
			printf("  abort     never (abort_failure_ratio 1)\n");
		else
			printf("  abort     when failures exceed %g of the finished "
			       "(after %" PRId64 " finished)\n", q,
			       jint(r, "min_finished"));
	}
	if (params && !(json_is_object(params) && !json_object_size(params))) {
		char *s = jdump(params);

		printf("  params    %s\n", s);
		free(s);
	}
	memset(&b, 0, sizeof(b));
	sb_counts(&b, json_object_get(r, "counts"), ", ");
	printf("  counts    %s\n", b.d);
	sb_free(&b);
	print_stamps(r);
	fflush(stdout);
}

/* "r_… completed: succeeded 7, failed 1" */
static void
print_rollout_final(json_t *r)
{
	struct sbuf b = { 0 };

	sb_counts(&b, json_object_get(r, "counts"), ", ");
	printf("%s %s: %s\n", jstr(r, "id"), jstr(r, "status"), b.d);
	fflush(stdout);
	sb_free(&b);
}

/*
 * Follows a rollout until completed or aborted: GET once a second; a line
 * each time it changed (rewritten in place on a terminal), the rollout as
 * JSON with --json. Takes r (the last document seen).
 */
static int
follow_rollout(const char *id, json_t *r)
{
	int tty = !o.json && isatty(STDOUT_FILENO);
	char *last = NULL, released[64];
	int line_open = 0, ex = EX_OK;

	for (;;) {
		const char *st = jstr(r, "status");
		char *now_s = o.json ? jdump(r) : rollout_progress(r);
		int running = !strcmp(st, "running");

		if (!last || strcmp(now_s, last)) {
			if (o.json) {
				fputs(now_s, stdout);
				fputc('\n', stdout);
			} else if (tty) {
				printf("\r\033[K%s", now_s);
				line_open = 1;
			} else {
				printf("%s\n", now_s);
			}
			fflush(stdout);
			free(last);
			last = now_s;
		} else {
			free(now_s);
		}
		if (!running) {
			if (line_open)
				putchar('\n');
			if (!o.json)
				print_rollout_final(r);
			ex = rollout_exit(r);
			break;
		}
		nap_until(mono_ms() + CTL_FLEET_POLL_MS);
		snprintf(released, sizeof(released), " (released %" PRId64 "/%" PRId64
			 ")", jint(r, "released"), jint(r, "total"));
		if (g_interrupted) {
			if (line_open)
				putchar('\n');
			ex = wait_interrupted("rollout", id, st, released);
			break;
		}
		/* too close to --timeout for one more request: give up */
		if (g_deadline && g_deadline - mono_ms() < 100) {
			if (line_open)
				putchar('\n');
			ex = wait_timed_out("rollout", id, st, released,
					    "the rollout did not complete in time");
			break;
		}
		{
			json_t *nr;

			if (line_open) {
				/* a diagnostic of the GET must not land mid-line */
				fflush(stdout);
			}
			ex = fetch_command(id, &nr);
			if (ex) {
				if (line_open)
					putchar('\n');
				break;
			}
			json_decref(r);
			r = nr;
		}
	}
	free(last);
	json_decref(r);
	fflush(stdout);
	return ex;
}

static int
cmd_send_fleet(int argc, char **argv, int i)
{
	const char *type = NULL, *name = NULL, *params = NULL, *v;
	json_t *body = json_object(), *labels = json_object(), *ro = json_object();
	json_t *doc = NULL, *target;
	int wait = 0, ex;
	char *id;

	for (; i < argc; i++) {
		if (opt_val(argv, argc, &i, "type", &v)) {
			type = v;
		} else if (opt_val(argv, argc, &i, "label", &v)) {
			add_label(labels, v);
		} else if (opt_val(argv, argc, &i, "params", &v)) {
			params = v;
		} else if (int_field_opt(argv, argc, &i, "max-per-minute", ro,
					 "max_per_minute")) {
			/* taken */
		} else if (opt_val(argv, argc, &i, "abort-failure-ratio", &v)) {
			char *end;
			double q;

			errno = 0;
			q = strtod(v, &end);
			if (!*v || *end || errno || q != q || q < -1e9 || q > 1e9)
				die_usage("--abort-failure-ratio: expected a number from 0 "
					  "to 1, got '%s'", v);
			json_object_set_new(ro, "abort_failure_ratio", json_real(q));
		} else if (int_field_opt(argv, argc, &i, "min-finished", ro,
					 "min_finished") ||
			   limit_opt(argv, argc, &i, body)) {
			/* taken */
		} else if (opt_flag(argv[i], "wait")) {
			wait = 1;
		} else if (global_opt(argv, argc, &i)) {
			/* taken */
		} else {
			take_positional("send-fleet", argv[i], &name, 1);
		}
	}
	if (!type || !*type)
		die_usage("send-fleet: --type T is required");
	if (!name || !*name)
		die_usage("send-fleet: expected NAME");
	target = json_object();
	json_object_set_new(target, "device_type", json_string(type));
	if (!json_object_get(target, "device_type"))
		die_usage("send-fleet: --type is not valid UTF-8");
	if (json_object_size(labels))
		json_object_set(target, "labels", labels);
	json_decref(labels);
	json_object_set_new(body, "target", target);
	json_object_set_new(body, "name", json_string(name));
	if (!json_object_get(body, "name"))
		die_usage("send-fleet: NAME is not valid UTF-8");
	if (params)
		json_object_set_new(body, "params", parse_params(params));
	if (json_object_size(ro))
		json_object_set(body, "rollout", ro);
	json_decref(ro);
	parse_url();
	check_key();

	ex = create("/v1/commands", body, NULL, "rollout", &doc, NULL);
	if (ex)
		return ex;
	if (o.json) {
		print_json_line(doc);
	} else if (!wait) {
		printf("%s %s %" PRId64 " device(s)\n", jstr(doc, "id"), jstr(doc, "status"),
		       jint(doc, "total"));
	} else {
		struct sbuf b = { 0 };

		sb_labels(&b, json_object_get(doc, "labels"));
		printf("%s  %s on %" PRId64 " %s device(s) (labels %s) at %" PRId64 "/min\n",
		       jstr(doc, "id"), jstr(doc, "name"), jint(doc, "total"),
		       jstr(doc, "device_type"), b.d, jint(doc, "max_per_minute"));
		sb_free(&b);
	}
	fflush(stdout);
	if (!wait) {
		json_decref(doc);
		return EX_OK;
	}
	id = strdup(jstr(doc, "id"));
	if (o.json) {
		/* the 202 body was printed; follow from the next GET */
		json_t *r;

		ex = fetch_command(id, &r);
		json_decref(doc);
		if (!ex)
			ex = follow_rollout(id, r);
	} else {
		ex = follow_rollout(id, doc);
	}
	free(id);
	return ex;
}

/*
 * The one argument of cmd (show, cancel, show-rollout), an ID of what
 * ("command", "rollout"), among global options; a usage error without it.
 */
static const char *
id_arg(int argc, char **argv, int i, const char *cmd, const char *what)
{
	const char *id = NULL;

	for (; i < argc; i++)
		if (!global_opt(argv, argc, &i))
			take_positional(cmd, argv[i], &id, 1);
	if (!id || !*id)
		die_usage("%s: expected a %s ID", cmd, what);
	return id;
}

static int
cmd_show_rollout(int argc, char **argv, int i)
{
	const char *id = id_arg(argc, argv, i, "show-rollout", "rollout");
	json_t *r;
	int ex;

	if (strncmp(id, "r_", 2))
		die_usage("show-rollout: a rollout ID starts with r_ (show ID for a command)");
	parse_url();
	check_key();
	ex = fetch_command(id, &r);
	if (ex)
		return ex;
	if (o.json)
		print_json_line(r);
	else
		print_rollout_human(r);
	json_decref(r);
	return EX_OK;
}

/* ------------------------------------------------------------------------ */
/* show, cancel, list-commands, devices                                       */

static int
cmd_show(int argc, char **argv, int i, int cancel)
{
	const char *id = id_arg(argc, argv, i, cancel ? "cancel" : "show", "command");
	json_t *c;
	int ex;

	parse_url();
	check_key();
	ex = command_api(id, cancel, &c);
	if (ex)
		return ex;
	if (o.json)
		print_json_line(c);
	else if (cancel)
		printf("%s %s\n", jstr(c, "id"), jstr(c, "status"));
	else if (!strncmp(id, "r_", 2))
		print_rollout_human(c);   /* a rollout: as show-rollout */
	else
		print_command_human(c, 1);
	json_decref(c);
	return EX_OK;
}

static int
cmd_list(int argc, char **argv, int i)
{
	const char *device = NULL, *status = NULL, *limit = NULL;
	struct sbuf p = { 0 };
	json_t *doc, *arr, *c;
	size_t k;
	int ex;

	for (; i < argc; i++) {
		if (opt_val(argv, argc, &i, "status", &status)) {
			int ok = 0;

			for (int s = 0; ALL_STATES[s]; s++)
				ok |= !strcmp(status, ALL_STATES[s]);
			if (!ok)
				die_usage("--status: one of queued, sent, received, "
					  "in_progress, succeeded, failed, rejected, "
					  "timed_out, expired, canceled");
		} else if (opt_val(argv, argc, &i, "limit", &limit)) {
			parse_int("--limit", limit, 1, 1000);
		} else if (global_opt(argv, argc, &i)) {
			/* taken */
		} else {
			take_positional("list-commands", argv[i], &device, 1);
		}
	}
	if (!device || !*device)
		die_usage("list-commands: expected DEVICE");
	parse_url();
	check_key();
	sb_device_commands(&p, device);
	if (status || limit) {
		sb_puts(&p, "?");
		if (status) {
			sb_puts(&p, "status=");
			sb_urlenc(&p, status);
		}
		if (limit) {
			sb_puts(&p, status ? "&limit=" : "limit=");
			sb_urlenc(&p, limit);
		}
	}
	ex = api("GET", p.d, NULL, NULL, &doc, NULL);
	sb_free(&p);
	if (ex)
		return ex;
	arr = json_object_get(doc, "commands");
	if (o.json) {
		print_json_line(doc);
	} else {
		printf("%-34s %-12s %-18s %-7s %s\n", "ID", "STATUS", "NAME", "ATTEMPT",
		       "CREATED");
		json_array_foreach(arr, k, c) {
			char t[40], att[24];

			fmt_ms(jint(c, "created_at"), 1, t, sizeof(t));
			snprintf(att, sizeof(att), "%" PRId64 "/%" PRId64,
				 jint(c, "attempt"), jint(c, "max_attempts"));
			printf("%-34s %-12s %-18s %-7s %s\n", jstr(c, "id"),
			       jstr(c, "status"), jstr(c, "name"), att, t);
		}
	}
	json_decref(doc);
	return EX_OK;
}

static int
cmd_devices(int argc, char **argv, int i)
{
	const char *type = NULL, *online = NULL, *limit = NULL, *v;
	json_t *labels = json_object(), *doc, *arr, *d;
	struct sbuf p = { 0 };
	const char *sep = "?";
	size_t k;
	int ex;

	for (; i < argc; i++) {
		if (opt_val(argv, argc, &i, "type", &type)) {
		} else if (opt_val(argv, argc, &i, "online", &online)) {
			if (strcmp(online, "true") && strcmp(online, "false"))
				die_usage("--online: true or false");
		} else if (opt_val(argv, argc, &i, "label", &v)) {
			add_label(labels, v);
		} else if (opt_val(argv, argc, &i, "limit", &limit)) {
			parse_int("--limit", limit, 1, 1000);
		} else if (global_opt(argv, argc, &i)) {
		} else {
			die_usage("devices: unexpected argument '%s'", argv[i]);
		}
	}
	parse_url();
	check_key();
	sb_puts(&p, "/v1/devices");
	if (type) {
		sb_printf(&p, "%sdevice_type=", sep);
		sb_urlenc(&p, type);
		sep = "&";
	}
	if (online) {
		sb_printf(&p, "%sonline=%s", sep, online);
		sep = "&";
	}
	if (limit) {
		sb_printf(&p, "%slimit=%s", sep, limit);
		sep = "&";
	}
	{
		const char *lk;
		json_t *lv;

		json_object_foreach(labels, lk, lv) {
			sb_printf(&p, "%slabel.", sep);
			sb_urlenc(&p, lk);
			sb_puts(&p, "=");
			sb_urlenc(&p, json_string_value(lv));
			sep = "&";
		}
	}
	json_decref(labels);
	ex = api("GET", p.d, NULL, NULL, &doc, NULL);
	sb_free(&p);
	if (ex)
		return ex;
	arr = json_object_get(doc, "devices");
	if (o.json) {
		print_json_line(doc);
	} else {
		printf("%-24s %-14s %-7s %-16s %-23s %s\n", "DEVICE", "TYPE", "ONLINE",
		       "GATEWAY", "LAST_SEEN", "LABELS");
		json_array_foreach(arr, k, d) {
			char t[40], *l = jdump(json_object_get(d, "labels"));

			fmt_ms(jint(d, "last_seen"), 1, t, sizeof(t));
			printf("%-24s %-14s %-7s %-16s %-23s %s\n", jstr(d, "device"),
			       jstr(d, "device_type"),
			       json_is_true(json_object_get(d, "online")) ? "yes" : "no",
			       json_is_string(json_object_get(d, "gateway")) ?
			       jstr(d, "gateway") : "-", t, l);
			free(l);
		}
		if (json_is_true(json_object_get(doc, "truncated")))
			printf("(more devices match: narrow the filter or raise --limit)\n");
	}
	json_decref(doc);
	return EX_OK;
}

/* ------------------------------------------------------------------------ */
/* tail                                                                       */

static void
print_stream_human(json_t *m)
{
	const char *type = jstr(m, "type");
	char t[32];

	if (!strcmp(type, "reading")) {
		char *d = jdump(json_object_get(m, "data"));

		fmt_ms(jint(m, "ts"), 0, t, sizeof(t));
		printf("%s  %-20s %s  pos %s\n", t, jstr(m, "device"), d, jstr(m, "pos"));
		free(d);
	} else if (!strcmp(type, "presence")) {
		fmt_ms(jint(m, "at"), 0, t, sizeof(t));
		printf("%s  %-20s %s", t, jstr(m, "device"),
		       json_is_true(json_object_get(m, "online")) ? "online" : "offline");
		if (*jstr(m, "gateway"))
			printf(" via %s", jstr(m, "gateway"));
		if (*jstr(m, "device_type"))
			printf(" (%s)", jstr(m, "device_type"));
		putchar('\n');
	} else if (!strcmp(type, "command_status")) {
		fmt_ms(jint(m, "at"), 0, t, sizeof(t));
		printf("%s  %-20s %s %s %s", t, jstr(m, "device"), jstr(m, "id"),
		       jstr(m, "name"), jstr(m, "status"));
		print_status_details(m);
		putchar('\n');
	} else if (!strcmp(type, "aggregate")) {
		json_t *metrics = json_object_get(m, "metrics"), *mv;
		const char *k;

		fmt_ms(jint(m, "start"), 0, t, sizeof(t));
		printf("%s  %-20s %s", t, json_object_get(m, "group") ?
		       "(group)" : jstr(m, "device"), jstr(m, "window"));
		if (json_object_get(m, "group")) {
			char *g = jdump(json_object_get(m, "group"));

			printf(" %s", g);
			free(g);
		}
		json_object_foreach(metrics, k, mv)
			printf("  %s n=%" PRId64 " min=%g max=%g avg=%g last=%g", k,
			       jint(mv, "count"),
			       json_number_value(json_object_get(mv, "min")),
			       json_number_value(json_object_get(mv, "max")),
			       json_number_value(json_object_get(mv, "avg")),
			       json_number_value(json_object_get(mv, "last")));
		putchar('\n');
	} else if (!strcmp(type, "gap")) {
		printf("-- gap: %" PRId64 " message(s) dropped%s%s\n", jint(m, "dropped"),
		       *jstr(m, "reason") ? ", " : "", jstr(m, "reason"));
	} else {
		char *s = jdump(m);

		printf("%s\n", s);
		free(s);
	}
	fflush(stdout);
}

static int
cmd_tail(int argc, char **argv, int i)
{
	static const char *const streams[] = { "raw", "1s", "10s", "1m", "presence",
					       "commands", NULL };
	const char *stream = "raw", *type = NULL, *since = NULL, *group_by = NULL, *v;
	json_t *devices = json_array(), *labels = json_object(), *filter, *sub;
	long long count = 0, seen = 0;
	struct ws *w;
	int ex, ok = 0;

	for (; i < argc; i++) {
		if (opt_val(argv, argc, &i, "stream", &stream)) {
		} else if (opt_val(argv, argc, &i, "device", &v)) {
			json_t *s = json_string(v);

			if (!s || !*v)
				die_usage("--device: a device id or prefix*, got '%s'", v);
			json_array_append_new(devices, s);
		} else if (opt_val(argv, argc, &i, "type", &type)) {
		} else if (opt_val(argv, argc, &i, "label", &v)) {
			add_label(labels, v);
		} else if (opt_val(argv, argc, &i, "since", &since)) {
		} else if (opt_val(argv, argc, &i, "group-by", &group_by)) {
		} else if (opt_val(argv, argc, &i, "count", &v)) {
			count = parse_int("--count", v, 1, INT64_MAX / 2);
		} else if (opt_val(argv, argc, &i, "timeout", &v)) {
			o.timeout = parse_secs("--timeout", v);
		} else if (global_opt(argv, argc, &i)) {
		} else {
			die_usage("tail: unexpected argument '%s'", argv[i]);
		}
	}
	for (int s = 0; streams[s]; s++)
		ok |= !strcmp(stream, streams[s]);
	if (!ok)
		die_usage("--stream: one of raw, 1s, 10s, 1m, presence, commands");
	if (since && strcmp(stream, "raw"))
		die_usage("--since: only with --stream raw");
	if (group_by && (!strcmp(stream, "raw") || !strcmp(stream, "presence") ||
			 !strcmp(stream, "commands")))
		die_usage("--group-by: only with --stream 1s, 10s or 1m");
	parse_url();
	check_key();
	if (o.timeout > 0)
		g_deadline = mono_ms() + (int64_t)(o.timeout * 1000);

	filter = json_object();
	if (json_array_size(devices))
		json_object_set(filter, "devices", devices);
	if (type)
		json_object_set_new(filter, "device_type", json_string(type));
	if (json_object_size(labels))
		json_object_set(filter, "labels", labels);
	json_decref(devices);
	json_decref(labels);
	sub = json_pack("{s:s,s:s,s:s,s:o}", "type", "subscribe", "id", "hubctl",
			"stream", stream, "filter", filter);
	if (since)
		json_object_set_new(sub, "since", json_string(since));
	if (group_by)
		json_object_set_new(sub, "group_by", json_string(group_by));
	w = stream_subscribe(sub, 0, &ex);
	json_decref(sub);
	if (!w)
		return ex;
	if (o.verbose)
		fprintf(stderr, "hubctl: subscribed to %s\n", stream);

	ex = EX_OK;
	while (!count || seen < count) {
		char *msg;
		size_t len;
		json_t *m;
		int r = ws_recv(w, &msg, &len, g_deadline);

		if (r == E_INTR)
			break;   /* Ctrl-C: a normal end of tail */
		if (r == E_TIMEOUT) {
			if (count)
				ex = EX_WAIT_TIMEOUT;
			break;
		}
		if (r == 0) {
			fprintf(stderr, "hubctl: the hub closed the stream (code %d)\n",
				w->close_code);
			ex = EX_UNREACHABLE;
			break;
		}
		if (r < 0) {
			ex = report_net(r);
			break;
		}
		m = json_loadb(msg, len, 0, NULL);
		free(msg);
		if (!m)
			continue;
		if (!strcmp(jstr(m, "type"), "error")) {
			fprintf(stderr, "hubctl: stream error %s: %s\n", jstr(m, "code"),
				jstr(m, "message"));
		}
		if (o.json) {
			json_object_del(m, "sub");
			print_json_line(m);
		} else {
			print_stream_human(m);
		}
		{
			const char *type2 = jstr(m, "type");

			if (strcmp(type2, "gap") && strcmp(type2, "error"))
				seen++;
		}
		json_decref(m);
	}
	if (ex == EX_WAIT_TIMEOUT)
		fprintf(stderr, "hubctl: %lld of %lld messages before the timeout\n",
			seen, count);
	ws_close(w);
	return ex;
}

/* ------------------------------------------------------------------------ */

static void
usage(FILE *f)
{
	fputs(
"usage: hubctl [global options] COMMAND [options]\n"
"\n"
"Global options (also accepted after COMMAND, except --timeout after send\n"
"and send-fleet):\n"
"  --url URL          hub address (default $HUBCTL_URL or " CTL_DEFAULT_URL ")\n"
"  --key KEY          API key (default $HUBCTL_KEY)\n"
"  --key-file FILE    read the API key from the first line of FILE\n"
"  --json             machine output: one JSON document per line\n"
"  --timeout S        bound on the whole run (default: 10 s per request;\n"
"                     send --wait and tail wait without limit)\n"
"  --cafile FILE      CA to verify an https:// hub; --insecure: do not verify\n"
"  -v, --verbose      log requests on stderr\n"
"\n"
"Commands:\n"
"  send DEVICE NAME [--params JSON|@FILE] [--ack-timeout S] [--timeout S]\n"
"       [--ttl S] [--max-attempts N] [--idempotency-key K] [--wait]\n"
"  send-fleet --type T [--label k=v]... NAME [--params JSON|@FILE]\n"
"       [--max-per-minute N] [--abort-failure-ratio R] [--min-finished N]\n"
"       [--ack-timeout S] [--timeout S] [--ttl S] [--max-attempts N] [--wait]\n"
"  show ID\n"
"  show-rollout ID\n"
"  cancel ID\n"
"  list-commands DEVICE [--status S] [--limit N]\n"
"  devices [--type T] [--online true|false] [--label k=v]... [--limit N]\n"
"  tail [--stream raw|1s|10s|1m|presence|commands] [--device P]... [--type T]\n"
"       [--label k=v]... [--since POS] [--group-by LABEL] [--count N] [--timeout S]\n"
"\n"
"Exit: 0 ok/succeeded, 1 command failed/rejected/timed_out/expired/canceled\n"
"(--wait; send-fleet --wait: rollout aborted or any command failed/rejected/\n"
"timed_out/expired), 2 usage, 3 HTTP 4xx, 4 hub unreachable or 5xx, 5 wait\n"
"timed out.\n",
	      f);
}

int
main(int argc, char **argv)
{
	struct sigaction sa;
	const char *cmd = NULL, *v;
	int i, ex;

	signal(SIGPIPE, SIG_IGN);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigint;     /* no SA_RESTART: poll() returns EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	o.url = getenv("HUBCTL_URL");
	if (!o.url || !*o.url)
		o.url = CTL_DEFAULT_URL;
	if ((v = getenv("HUBCTL_KEY")) && *v)
		o.key = strdup(v);

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help") ||
		    !strcmp(argv[i], "help")) {
			usage(stdout);
			return EX_OK;
		}
		if (opt_val(argv, argc, &i, "timeout", &v)) {
			o.timeout = parse_secs("--timeout", v);
			continue;
		}
		if (global_opt(argv, argc, &i))
			continue;
		if (argv[i][0] == '-')
			die_usage("unknown option '%s'", argv[i]);
		cmd = argv[i++];
		break;
	}
	if (!cmd)
		die_usage("no command given");
	for (int k = i; k < argc; k++)
		if (!strcmp(argv[k], "-h") || !strcmp(argv[k], "--help")) {
			usage(stdout);
			return EX_OK;
		}
	if (o.timeout > 0)
		g_deadline = mono_ms() + (int64_t)(o.timeout * 1000);

	if (!strcmp(cmd, "send"))
		ex = cmd_send(argc, argv, i);
	else if (!strcmp(cmd, "send-fleet"))
		ex = cmd_send_fleet(argc, argv, i);
	else if (!strcmp(cmd, "show"))
		ex = cmd_show(argc, argv, i, 0);
	else if (!strcmp(cmd, "show-rollout"))
		ex = cmd_show_rollout(argc, argv, i);
	else if (!strcmp(cmd, "cancel"))
		ex = cmd_show(argc, argv, i, 1);
	else if (!strcmp(cmd, "list-commands"))
		ex = cmd_list(argc, argv, i);
	else if (!strcmp(cmd, "devices"))
		ex = cmd_devices(argc, argv, i);
	else if (!strcmp(cmd, "tail"))
		ex = cmd_tail(argc, argv, i);
	else
		die_usage("unknown command '%s'", cmd);

	fflush(stdout);
	if (g_ssl_ctx)
		SSL_CTX_free(g_ssl_ctx);
	free(o.key);
	free(o.host);
	free(o.port);
	free(o.host_hdr);
	free(o.prefix);
	return ex;
}
