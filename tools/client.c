/*
 * client.c - WebSocket and HTTP connections on one lws context (client.h).
 *
 * lws 4.1.6 facts this file depends on (read off the v4.1.6 sources):
 *  - Returning non-zero from CLIENT_RECEIVE skips the parser's reset of its rx
 *    buffer position while lws keeps reading for the close ack: the rest of
 *    the frame is written past its buffer (a heap overflow, seen as a SEGV).
 *    So RECEIVE always returns 0 and a close waits for WRITEABLE.
 *  - lws_write() masks client payload in place: what is kept is copied out.
 *  - WSI_DESTROY reaches the protocol once per wsi, also for a connect that
 *    failed inside lws_client_connect_via_info() (which then returns NULL and
 *    reports no CONNECTION_ERROR): the one "gone" hook.
 *  - A refused upgrade reaches ESTABLISHED_CLIENT_HTTP first, with the status
 *    and the body still unread; lws_http_client_read() there hands the body
 *    over, after which lws fails the upgrade ("HS: ws upgrade ...").
 *  - Every client connection gets the context's idle (validity) policy
 *    unless it has its own: a timer inserted into one sorted list per
 *    connection. At 18,000 connections that insert was 72 % of gw-sim's CPU
 *    (perf, lws_dll2_add_sorted). A policy without hangup skips it.
 *  - The libev glue re-arms its timer with ev_timer_set() + ev_timer_start()
 *    on a watcher that is still active after an fd event, which libev
 *    ignores: a timer set from a socket callback, earlier than the one armed,
 *    fired up to 10 s late (measured). Only the timer's own callback re-arms
 *    it right, so a 10 ms heartbeat bounds every timer's lateness to 10 ms.
 *  - lws_sul_schedule() does not arm the libev timer by itself (fd events and
 *    timer callbacks do): hc_run() wakes the loop once first.
 *  - The ev backend installs its own SIGINT watcher: ours goes in after
 *    lws_create_context(). A timer callback runs inside the service, where
 *    lws_context_destroy() is deferred until the loop returns.
 *  - In lws 4.1.6 setting fd_limit_per_thread makes the fd -> wsi lookup a
 *    linear search (35 % of the CPU at 3,000 connections): left unset, the
 *    table is sized from RLIMIT_NOFILE.
 */

#define _GNU_SOURCE
#include "tools/client.h"

#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/x509.h>

#include "hub/util.h"

#define HC_HEARTBEAT_US  10000
#define HC_QUEUE_MAX     64
#define HC_BODY_MAX      (64u << 10)   /* a refused upgrade's body we keep */

struct hc_msg {
	struct hc_msg *next;
	size_t len;
	char data[];
};

struct hc_conn {
	struct hc_ctx *x;
	struct lws *wsi;
	const struct hc_cbs *cb;
	void *user;
	const char *auth, *hname, *hvalue, *body;   /* borrowed (hc_conn_opts) */
	size_t body_len, max;
	hub_buf rx;                 /* a message in pieces, or a refused body */
	struct hc_msg *q, *q_tail;
	unsigned nq;
	int status, close_code, close_status;
	char *error, *reason, *close_reason;
	unsigned http:1, raw:1, opened:1, closing:1, discard:1, connecting:1,
		 gone:1, aborted:1, write_failed:1, completed:1;
};

struct hc_ctx {
	struct lws_context *lws;
	struct lws_protocols protocols[2];
	void (*on_signal)(struct hc_ctx *x, int count);
	int stopped, sig_seen;
	unsigned char *tx;
	size_t tx_cap;
	lws_sorted_usec_list_t sul_beat, sul_signal, sul_wait;
};

static struct lws_context *volatile sig_lws;
static volatile sig_atomic_t sig_count;
static struct hc_ctx *sig_x;   /* the context whose on_signal runs */

static void signal_cb(lws_sorted_usec_list_t *sul);

/* ------------------------------------------------------------------------ */
/* URLs                                                                       */

static int url_fail(char *err, size_t errlen, const char *what, const char *url)
{
	snprintf(err, errlen, "%s in '%s'", what, url);
	return -1;
}

int hc_url_parse(struct hc_url *u, const char *url, unsigned schemes,
		 char *err, size_t errlen)
{
	static const struct { const char *p; unsigned kind; int tls; } sch[] = {
		{ "ws://", HC_WS, 0 }, { "wss://", HC_WS, 1 },
		{ "http://", HC_HTTP, 0 }, { "https://", HC_HTTP, 1 },
	};
	const char *h = NULL, *he, *pe, *ps = NULL;

	memset(u, 0, sizeof(*u));
	for (size_t i = 0; i < 4 && !h; i++)
		if ((schemes & sch[i].kind) && !strncmp(url, sch[i].p, strlen(sch[i].p))) {
			h = url + strlen(sch[i].p);
			u->tls = sch[i].tls;
		}
	if (!h) {
		const char *sc = schemes & HC_HTTP ? "http" : "ws";

		snprintf(err, errlen, "expected %s://HOST[:PORT][/PATH] or %ss://..., got '%s'",
			 sc, sc, url);
		return -1;
	}
	pe = h + strcspn(h, "/?#");
	if (*h == '[') {
		he = memchr(h, ']', (size_t)(pe - h));
		if (!he)
			return url_fail(err, errlen, "unterminated [", url);
		u->host = strndup(h + 1, (size_t)(he - h - 1));
		he++;
	} else {
		he = memchr(h, ':', (size_t)(pe - h));
		he = he ? he : pe;
		u->host = strndup(h, (size_t)(he - h));
	}
	if (!u->host)
		abort();
	if (!*u->host)
		return url_fail(err, errlen, "no host", url);
	for (const char *q = u->host; *q; q++)
		if ((unsigned char)*q <= ' ' || *q == 0x7f || *q == '/')
			return url_fail(err, errlen, "bad host", url);
	u->port = u->tls ? 443 : 80;
	if (*he == ':') {
		ps = he + 1;
		int64_t port;
		if (hub_parse_i64(ps, (size_t)(pe - ps), 1, 65535, &port))
			return url_fail(err, errlen, "bad port (1 to 65535)", url);
		u->port = (int)port;
	} else if (he != pe) {
		return url_fail(err, errlen, "bad host part", url);
	}
	if (*pe == '?')
		return url_fail(err, errlen, "a query without a path", url);
	u->path = strndup(*pe == '/' ? pe : "/", *pe == '/' ? strcspn(pe, "#") : 1);
	if (!u->path)
		abort();
	for (const char *q = u->path; *q; q++)
		if ((unsigned char)*q <= ' ' || *q == 0x7f)
			return url_fail(err, errlen, "spaces or control characters", url);
	hub_buf b = { 0 };
	hub_buf_printf(&b, strchr(u->host, ':') ? "[%s]" : "%s", u->host);
	if (u->port != (u->tls ? 443 : 80))
		hub_buf_printf(&b, ":%d", u->port);
	u->host_hdr = b.data;
	return 0;
}

void hc_url_free(struct hc_url *u)
{
	free(u->host);
	free(u->path);
	free(u->host_hdr);
	memset(u, 0, sizeof(*u));
}

/* ------------------------------------------------------------------------ */
/* connections                                                                */

static void conn_free(struct hc_conn *c)
{
	while (c->q) {
		struct hc_msg *m = c->q;
		c->q = m->next;
		free(m);
	}
	hub_buf_free(&c->rx);
	free(c->error);
	free(c->reason);
	free(c->close_reason);
	free(c);
}

/* No validity (idle PING) timer: see the top of the file. */
static const lws_retry_bo_t no_idle_policy = { 0 };

struct hc_conn *hc_connect(struct hc_ctx *x, const struct hc_conn_opts *o)
{
	struct lws_client_connect_info ci;
	struct hc_conn *c = hub_xcalloc(1, sizeof(*c));
	hub_buf path = { 0 };

	c->x = x;
	c->cb = o->cb;
	c->user = o->user;
	c->http = o->method != NULL;
	c->raw = o->raw;
	c->max = o->max_message ? o->max_message : 1u << 20;
	c->auth = o->auth;
	c->hname = o->header_name;
	c->hvalue = o->header_value;
	c->body = o->body;
	c->body_len = o->body_len;
	/* url->path is a prefix: "/" + "/v1/x" is "/v1/x" */
	if (o->path && !strcmp(o->url->path, "/"))
		hub_buf_puts(&path, o->path);
	else
		hub_buf_printf(&path, "%s%s", o->url->path, o->path ? o->path : "");

	memset(&ci, 0, sizeof(ci));
	ci.context = x->lws;
	ci.retry_and_idle_policy = &no_idle_policy;
	ci.address = o->url->host;
	ci.port = o->url->port;
	ci.path = path.data;
	ci.host = o->url->host_hdr;
	ci.origin = o->url->host_hdr;
	ci.method = o->method;
	ci.protocol = o->subprotocol;
	ci.local_protocol_name = "hc";
	ci.iface = o->iface;
	ci.opaque_user_data = c;
	ci.ssl_connection = LCCSCF_HTTP_NO_FOLLOW_REDIRECT;
	if (o->url->tls)
		ci.ssl_connection |= LCCSCF_USE_SSL;
	if (o->url->tls && o->insecure)
		ci.ssl_connection |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_ALLOW_EXPIRED |
			LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK | LCCSCF_ALLOW_INSECURE;
	c->connecting = 1;
	c->wsi = lws_client_connect_via_info(&ci);
	c->connecting = 0;
	hub_buf_free(&path);
	if (!c->wsi || c->gone) {
		/* WSI_DESTROY, if it came, left c to us */
		conn_free(c);
		return NULL;
	}
	return c;
}

void hc_want_write(struct hc_conn *c)
{
	if (c->wsi && c->opened && !c->http)
		lws_callback_on_writable(c->wsi);
}

int hc_write(struct hc_conn *c, const void *data, size_t len, int binary)
{
	unsigned char *p = hc_txbuf(c->x, len);

	if (p != data)
		memcpy(p, data, len);
	if (lws_write(c->wsi, p, len, binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT) < (int)len) {
		c->write_failed = 1;
		return -1;
	}
	return 0;
}

int hc_send(struct hc_conn *c, const char *text, size_t len)
{
	struct hc_msg *m;

	if (c->closing || c->nq >= HC_QUEUE_MAX)
		return -1;
	m = hub_xmalloc(sizeof(*m) + len);
	m->next = NULL;
	m->len = len;
	memcpy(m->data, text, len);
	if (c->q_tail)
		c->q_tail->next = m;
	else
		c->q = m;
	c->q_tail = m;
	c->nq++;
	hc_want_write(c);
	return 0;
}

void hc_close(struct hc_conn *c, int code, const char *reason)
{
	if (c->closing || !c->wsi)
		return;
	c->closing = 1;
	c->close_status = code;
	c->close_reason = reason ? hub_xstrdup(reason) : NULL;
	if (c->opened && !c->http)
		lws_callback_on_writable(c->wsi);
	else
		lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
}

void hc_abort(struct hc_conn *c)
{
	c->aborted = 1;
	c->opened = 0;   /* no close handshake: kill it */
	hc_close(c, 0, NULL);
}

int hc_signal_count(void)
{
	return sig_count;
}

/* ------------------------------------------------------------------------ */
/* the lws callback                                                           */

static void deliver(struct hc_conn *c, const char *in, size_t len, int final)
{
	if (c->raw || (!c->rx.len && final)) {
		c->cb->on_message(c, in, len, c->user);
		return;
	}
	if (c->discard) {
		c->discard = !final;
		return;
	}
	if (c->rx.len + len > c->max) {
		c->discard = !final;
		c->rx.len = 0;
		c->cb->on_message(c, NULL, len, c->user);
		return;
	}
	hub_buf_append(&c->rx, in, len);
	if (final) {
		size_t n = c->rx.len;

		c->rx.len = 0;   /* before the callback: it may close */
		c->cb->on_message(c, c->rx.data, n, c->user);
	}
}

static int writeable(struct hc_conn *c, struct lws *wsi)
{
	if (!c->closing && c->q) {
		struct hc_msg *m = c->q;

		c->q = m->next;
		if (!c->q)
			c->q_tail = NULL;
		c->nq--;
		hc_write(c, m->data, m->len, 0);
		free(m);
		if (c->q)
			lws_callback_on_writable(wsi);
	} else if (!c->closing && c->cb->on_writeable) {
		c->cb->on_writeable(c, c->user);
	}
	if (c->write_failed)
		return -1;
	if (!c->closing)
		return 0;
	lws_close_reason(wsi, (enum lws_close_status)(c->close_status ? c->close_status :
						      LWS_CLOSE_STATUS_NORMAL),
			 (unsigned char *)(c->close_reason ? c->close_reason : ""),
			 c->close_reason ? strlen(c->close_reason) : 0);
	return -1;
}

static int http_event(struct hc_conn *c, struct lws *wsi, enum lws_callback_reasons reason,
		      void *in, size_t len)
{
	switch (reason) {
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
		unsigned char **p = in, *end = *p + len;
		char n[24];

		snprintf(n, sizeof(n), "%zu", c->body_len);
		if ((c->auth && lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_AUTHORIZATION,
				(unsigned char *)c->auth, (int)strlen(c->auth), p, end)) ||
		    (c->hname && lws_add_http_header_by_name(wsi, (unsigned char *)c->hname,
				(unsigned char *)c->hvalue, (int)strlen(c->hvalue), p, end)) ||
		    (c->http && c->body &&
		     (lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_TYPE,
				(unsigned char *)"application/json", 16, p, end) ||
		      lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH,
				(unsigned char *)n, (int)strlen(n), p, end)))) {
			c->error = hub_xstrdup("the request's headers do not fit lws's buffer");
			return -1;
		}
		if (!c->http || !c->body)
			return 0;
		lws_client_http_body_pending(wsi, 1);
		lws_callback_on_writable(wsi);
		return 0;
	}
	case LWS_CALLBACK_CLIENT_HTTP_WRITEABLE: {
		unsigned char *p = hc_txbuf(c->x, c->body_len);

		if (!c->body)
			return 0;
		memcpy(p, c->body, c->body_len);
		lws_client_http_body_pending(wsi, 0);
		return lws_write(wsi, p, c->body_len, LWS_WRITE_HTTP_FINAL) < (int)c->body_len ?
		       -1 : 0;
	}
	case LWS_CALLBACK_ESTABLISHED_CLIENT_HTTP:
		c->status = lws_http_client_http_response(wsi);
		if (c->http) {
			c->opened = 1;
			if (c->cb->on_open)
				c->cb->on_open(c, c->user);
			return 0;
		}
		if (c->status != 101) {
			/* a refused upgrade: its body, for on_close */
			char buf[1024 + LWS_PRE], *px = buf + LWS_PRE;
			int n = sizeof(buf) - LWS_PRE;

			lws_http_client_read(wsi, &px, &n);
		}
		return 0;
	case LWS_CALLBACK_RECEIVE_CLIENT_HTTP: {
		char buf[4096 + LWS_PRE], *px = buf + LWS_PRE;
		int n = sizeof(buf) - LWS_PRE;

		return lws_http_client_read(wsi, &px, &n) < 0 ? -1 : 0;
	}
	case LWS_CALLBACK_RECEIVE_CLIENT_HTTP_READ:
		if (!c->http) {
			if (c->rx.len + len <= HC_BODY_MAX)
				hub_buf_append(&c->rx, in, len);
		} else if (!c->closing) {
			c->cb->on_message(c, in, len, c->user);
		}
		return 0;
	case LWS_CALLBACK_COMPLETED_CLIENT_HTTP:
		/* the whole answer is in: this connection is done */
		c->completed = 1;
		lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
		return 0;
	default:
		return 0;
	}
}

static void conn_gone(struct hc_conn *c)
{
	struct hc_end end = { c->error, c->opened, c->status, c->close_code,
			      c->reason ? c->reason : "", NULL, 0 };

	c->gone = 1;
	c->wsi = NULL;
	if (c->connecting)
		return;   /* hc_connect() frees it and returns NULL */
	if (!c->http && c->status && c->status != 101) {
		hub_buf b = { 0 };

		/* lws's words for it lose the status */
		hub_buf_printf(&b, "the upgrade was refused with HTTP %d", c->status);
		free(c->error);
		end.error = c->error = b.data;
		end.body = c->rx.len ? c->rx.data : NULL;
		end.body_len = c->rx.len;
	}
	if (!end.error && !c->closing && (c->http ? !c->completed : !c->opened))
		end.error = c->status ? "the answer ended early" : "connection lost";
	if (!c->aborted && c->cb->on_close)
		c->cb->on_close(c, &end, c->user);
	conn_free(c);
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
		    void *in, size_t len)
{
	struct hc_ctx *x = sig_x;
	struct hc_conn *c;

	switch (reason) {
	case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
		if (x && sig_count != x->sig_seen && !x->stopped)
			lws_sul_schedule(x->lws, 0, &x->sul_signal, signal_cb, 0);
		return 0;
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: case LWS_CALLBACK_CLIENT_HTTP_WRITEABLE:
	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: case LWS_CALLBACK_CLIENT_ESTABLISHED:
	case LWS_CALLBACK_CLIENT_RECEIVE: case LWS_CALLBACK_CLIENT_WRITEABLE:
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE: case LWS_CALLBACK_WSI_DESTROY:
	case LWS_CALLBACK_ESTABLISHED_CLIENT_HTTP: case LWS_CALLBACK_RECEIVE_CLIENT_HTTP:
	case LWS_CALLBACK_RECEIVE_CLIENT_HTTP_READ: case LWS_CALLBACK_COMPLETED_CLIENT_HTTP:
	case LWS_CALLBACK_OPENSSL_PERFORM_SERVER_CERT_VERIFICATION:
		break;
	default:   /* not about a connection (the wsi may be lws's own) */
		return 0;
	}
	c = wsi ? lws_get_opaque_user_data(wsi) : NULL;
	if (!c || c->gone)
		return 0;
	c->wsi = wsi;
	if (c->aborted && reason != LWS_CALLBACK_WSI_DESTROY)   /* fail what it asks */
		return reason == LWS_CALLBACK_CLIENT_WRITEABLE ||
		       reason == LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER ||
		       reason == LWS_CALLBACK_CLIENT_HTTP_WRITEABLE ? -1 : 0;
	switch (reason) {
	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
		if (!c->error)   /* a certificate's verdict says more than lws */
			c->error = hub_xstrdup(in && len ? (const char *)in : "connection failed");
		return 0;
	case LWS_CALLBACK_OPENSSL_PERFORM_SERVER_CERT_VERIFICATION:
		/* user: the X509_STORE_CTX, len: OpenSSL's verdict; 0 keeps it */
		if (!len && !c->error) {
			hub_buf b = { 0 };

			hub_buf_printf(&b, "TLS: the server's certificate does not verify: %s",
				       X509_verify_cert_error_string(X509_STORE_CTX_get_error(user)));
			c->error = b.data;
		}
		return 0;
	case LWS_CALLBACK_CLIENT_ESTABLISHED:
		c->opened = 1;
		if (c->cb->on_open)
			c->cb->on_open(c, c->user);
		if (c->q)
			lws_callback_on_writable(wsi);
		return 0;
	case LWS_CALLBACK_CLIENT_RECEIVE:
		/* always 0: see the top of the file */
		if (!c->closing)
			deliver(c, in, len, lws_is_final_fragment(wsi));
		return 0;
	case LWS_CALLBACK_CLIENT_WRITEABLE:
		return writeable(c, wsi);
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (len >= 2) {
			const unsigned char *b = in;

			c->close_code = (b[0] << 8) | b[1];
			free(c->reason);
			c->reason = strndup((const char *)in + 2, len - 2);
		}
		return 0;
	case LWS_CALLBACK_WSI_DESTROY:
		conn_gone(c);
		return 0;
	default:
		return http_event(c, wsi, reason, in, len);
	}
}

/* ------------------------------------------------------------------------ */
/* the context                                                                */

static void on_signal(int sig)
{
	struct lws_context *lws = sig_lws;

	(void)sig;
	sig_count++;
	if (lws)
		lws_cancel_service(lws);
}

/* runs from the ev timer's own callback, where lws re-arms the timer right */
static void heartbeat_cb(lws_sorted_usec_list_t *sul)
{
	struct hc_ctx *x = lws_container_of(sul, struct hc_ctx, sul_beat);

	if (!x->stopped)
		lws_sul_schedule(x->lws, 0, &x->sul_beat, heartbeat_cb, HC_HEARTBEAT_US);
}

static void signal_cb(lws_sorted_usec_list_t *sul)
{
	struct hc_ctx *x = lws_container_of(sul, struct hc_ctx, sul_signal);
	int n = sig_count;

	if (n != x->sig_seen && !x->stopped) {
		x->sig_seen = n;
		if (x->on_signal)
			x->on_signal(x, n);
	}
}

struct hc_ctx *hc_ctx_new(const struct hc_ctx_opts *o, char *err, size_t errlen)
{
	const char *files[] = { o->ca_file, o->cert_file, o->key_file };
	struct lws_context_creation_info info;
	struct hc_ctx *x;

	/* lws would log a missing file and go on without it */
	for (size_t i = 0; i < 3; i++)
		if (files[i] && access(files[i], R_OK)) {
			snprintf(err, errlen, "%s: %s", files[i], strerror(errno));
			return NULL;
		}
	x = hub_xcalloc(1, sizeof(*x));

	x->protocols[0] = (struct lws_protocols){ "hc", callback, 0,
						  o->rx_buffer ? o->rx_buffer : 1024, 0, NULL, 0 };
	x->on_signal = o->on_signal;
	memset(&info, 0, sizeof(info));
	info.port = CONTEXT_PORT_NO_LISTEN;
	info.protocols = x->protocols;
	info.options = (o->libev ? LWS_SERVER_OPTION_LIBEV : 0) |
		       (o->tls ? LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT : 0);
	info.gid = -1;
	info.uid = -1;
	info.timeout_secs = 10;
	info.user = x;
	info.client_ssl_ca_filepath = o->ca_file;
	info.client_ssl_cert_filepath = o->cert_file;
	info.client_ssl_private_key_filepath = o->key_file;
	x->lws = lws_create_context(&info);
	if (!x->lws) {
		snprintf(err, errlen, "cannot create the lws context (%s)", o->libev ?
			 "libev plugin libwebsockets-evlib-ev missing, or a bad CA or "
			 "certificate file?" : "a bad CA or certificate file?");
		free(x);
		return NULL;
	}
	if (o->signals) {
		struct sigaction sa;

		sig_x = x;
		sig_lws = x->lws;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_signal;
		sigemptyset(&sa.sa_mask);
		sigaction(SIGINT, &sa, NULL);
		sigaction(SIGTERM, &sa, NULL);
	}
	if (o->libev)
		lws_sul_schedule(x->lws, 0, &x->sul_beat, heartbeat_cb, HC_HEARTBEAT_US);
	return x;
}

struct lws_context *hc_lws(struct hc_ctx *x)
{
	return x->lws;
}

unsigned char *hc_txbuf(struct hc_ctx *x, size_t n)
{
	if (LWS_PRE + n > x->tx_cap) {
		x->tx_cap = LWS_PRE + n;
		x->tx = hub_xrealloc(x->tx, x->tx_cap);
	}
	return x->tx + LWS_PRE;
}

void hc_ctx_free(struct hc_ctx *x)
{
	if (!x)
		return;
	x->stopped = 1;
	if (sig_x == x) {
		sig_lws = NULL;
		sig_x = NULL;
	}
	if (x->lws)
		lws_context_destroy(x->lws);
	free(x->tx);
	free(x);
}

void hc_stop(struct hc_ctx *x)
{
	if (x->stopped)
		return;
	x->stopped = 1;
	lws_sul_cancel(&x->sul_beat);
	lws_sul_cancel(&x->sul_signal);
	lws_sul_cancel(&x->sul_wait);
	/* from a callback lws defers this until the loop unwinds */
	lws_context_destroy(x->lws);
}

void hc_run(struct hc_ctx *x)
{
	lws_cancel_service(x->lws);
	while (!x->stopped)
		if (lws_service(x->lws, 0) < 0)
			break;
	hc_ctx_free(x);
}

/* The deadline of hc_wait(). lws 4.1.6 polls right after running the ripe
 * timers, without a timeout when none is left: wake that poll at once. */
static void wait_cb(lws_sorted_usec_list_t *sul)
{
	lws_cancel_service(lws_container_of(sul, struct hc_ctx, sul_wait)->lws);
}

int hc_wait(struct hc_ctx *x, const int *done, int64_t deadline_us)
{
	int r = HC_DONE;

	if (deadline_us)
		lws_sul_schedule(x->lws, 0, &x->sul_wait, wait_cb,
				 deadline_us > hub_mono_us() ? deadline_us - hub_mono_us() : 0);
	while (!*done) {
		if (sig_count) {
			r = HC_INTR;
			break;
		}
		if (deadline_us && hub_mono_us() >= deadline_us) {
			r = HC_TIMEOUT;
			break;
		}
		if (lws_service(x->lws, 0) < 0) {
			r = HC_FAIL;
			break;
		}
	}
	lws_sul_cancel(&x->sul_wait);
	return r;
}
