/*
 * hubctl: the operator's command line for iot-hub (docs/hubctl.md). It drives
 * the HTTP API (commands, fleet rollouts, devices) and reads the dashboard
 * stream /v1/stream for `send --wait` and `tail`. A short-lived, single-
 * threaded client that does one thing at a time: every step is a synchronous
 * exchange on the tools' client layer (client.h), which services one lws
 * context until the answer is in, the deadline passes or Ctrl-C comes. Each
 * command has its own options table (hub/opts.h); the global options are
 * accepted before and after the command.
 *
 * Bounds: response bodies 32 MiB, stream messages 8 MiB, --params 64 KiB (the
 * hub's body cap), key files 4 KiB. Over a bound is a clean error, never a
 * crash.
 *
 * Exit codes: 0 ok / command succeeded; 1 command ended failed|rejected|
 * timed_out|expired|canceled (--wait), or a rollout aborted or with any
 * failed|rejected|timed_out|expired command (send-fleet --wait); 2 usage;
 * 3 HTTP 4xx (or a stream error answer); 4 hub unreachable, timed out or
 * 5xx; 5 --wait (or tail --count) timed out, or tail --timeout saw no message;
 * 130 interrupted during --wait.
 */

#define _GNU_SOURCE
#include <jansson.h>

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hub/opts.h"
#include "hub/prov_core.h"
#include "hub/util.h"
#include "tools/client.h"

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
#define CTL_REQ_TIMEOUT_US  10000000       /* per request when no --timeout */
#define CTL_BODY_MAX        (32u << 20)
#define CTL_WS_MSG_MAX      (8u << 20)
#define CTL_PARAMS_MAX      (64u << 10)
#define CTL_KEY_MAX         4096u
#define CTL_POLL_INTERVAL   500000         /* µs between GETs when polling */
#define CTL_FLEET_POLL      1000000        /* µs between GETs of a rollout */
#define CTL_SUBPROTOCOL     "iot-dashboard.v1"

/* transport results (negative) */
enum { E_NET = -1, E_TIMEOUT = -2, E_INTR = -3, E_PROTO = -4, E_BIG = -5 };

/* ------------------------------------------------------------------------ */
/* options and state                                                          */

static struct ctl {
	/* global options */
	char *url_s, *key, *cafile;
	int json, insecure, verbose;
	double timeout;                /* s; 0: not given */
	/* a command's options (the tables below) */
	char *params, *idem, *type, *status, *online, *stream, *since, *group_by;
	int wait;
	long n, limit, count;          /* n: scratch of the body's integer fields */
	double ratio;
	long vfrom, vto;               /* verify --from/--to (ms) */
	char *vkey;                    /* verify --pubkey */
	json_t *body, *ro, *labels, *devices;
	const char *cmd, *pos[2];
	int npos, maxpos;
	/* the run */
	struct hc_url url;
	char *auth;                    /* "Bearer <key>" */
	struct hc_ctx *x;
	int64_t deadline;              /* monotonic µs of --timeout; 0: none */
	char err[512];                 /* the last transport error */
} o;

static void set_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void set_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(o.err, sizeof(o.err), fmt, ap);
	va_end(ap);
}

static int interrupted(void)
{
	return hc_signal_count() > 0;
}

/* the deadline of one request: --timeout's overall deadline, else 10 s */
static int64_t req_deadline(void)
{
	return o.deadline ? o.deadline : hub_mono_us() + CTL_REQ_TIMEOUT_US;
}

/* t (monotonic µs), or the --timeout deadline if that comes first */
static int64_t until_deadline(int64_t t)
{
	return o.deadline && o.deadline < t ? o.deadline : t;
}

/* sleeps until t, the --timeout deadline or Ctrl-C, whichever comes first */
static void nap_until(int64_t t)
{
	static const int never;

	hc_wait(o.x, &never, until_deadline(t));
}

/* hc_wait()'s answer as an E_* (0: done) */
static int waited(int r)
{
	return r == HC_TIMEOUT ? E_TIMEOUT : r == HC_INTR ? E_INTR : r ? E_NET : 0;
}

/* percent-encode everything but unreserved characters (RFC 3986) and ':' */
static void urlenc(hub_buf *b, const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (isalnum(c) || strchr("-._~:", c))
			hub_buf_append(b, s, 1);
		else
			hub_buf_printf(b, "%%%02X", c);
	}
}

/* ------------------------------------------------------------------------ */
/* HTTP                                                                       */

struct http_resp {
	int status;
	char *body;
	size_t len;
};

/* one request in flight (the user of its connection) */
struct call {
	int done, big, status;
	hub_buf body;
	char *error;
};

static void call_body(struct hc_conn *c, const char *m, size_t n, void *user)
{
	struct call *k = user;

	if (k->big || k->body.len + n > CTL_BODY_MAX) {
		k->big = 1;
		hc_close(c, 0, NULL);
		return;
	}
	hub_buf_append(&k->body, m, n);
}

static void call_end(struct hc_conn *c, const struct hc_end *e, void *user)
{
	struct call *k = user;

	k->done = 1;
	k->status = e->status;
	k->error = e->error ? hub_xstrdup(e->error) : NULL;
}

static const struct hc_cbs call_cbs = { NULL, call_body, NULL, call_end };

/*
 * One request on a fresh connection. Returns 0 with *resp filled (any
 * status; the caller frees resp->body), or E_* with o.err set.
 */
static int http_request(const char *method, const char *path, const char *body,
			const char *idem, struct http_resp *resp)
{
	struct call k = { 0 };
	const struct hc_conn_opts co = {
		.url = &o.url, .path = path, .method = method, .auth = o.auth,
		.header_name = idem ? "idempotency-key:" : NULL, .header_value = idem,
		.body = body, .body_len = body ? strlen(body) : 0,
		.insecure = o.insecure, .cb = &call_cbs, .user = &k,
	};
	struct hc_conn *c = hc_connect(o.x, &co);
	int r = c ? waited(hc_wait(o.x, &k.done, req_deadline())) : E_NET;

	memset(resp, 0, sizeof(*resp));
	if (!c) {
		set_err("cannot connect to %s:%d", o.url.host, o.url.port);
	} else if (r) {
		hc_abort(c);
		if (r == E_TIMEOUT)
			set_err("no answer from %s:%d in time", o.url.host, o.url.port);
	} else if (k.big) {
		set_err("the hub's response is over %u bytes", CTL_BODY_MAX);
		r = E_BIG;
	} else if (!k.status) {
		set_err("cannot connect to %s:%d: %s", o.url.host, o.url.port,
			k.error ? k.error : "no answer");
		r = E_NET;
	} else if (k.error) {
		set_err("the hub closed the connection mid-response (%s)", k.error);
		r = E_PROTO;
	} else {
		resp->status = k.status;
		resp->len = k.body.len;
		resp->body = k.body.data ? k.body.data : hub_xstrdup("");
		k.body.data = NULL;
	}
	hub_buf_free(&k.body);
	free(k.error);
	return r;
}

/* ------------------------------------------------------------------------ */
/* output helpers                                                             */

static void fmt_ms(int64_t ms, int full, char *out, size_t n)
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

static int64_t jint(json_t *obj, const char *k)
{
	json_t *v = json_object_get(obj, k);

	if (json_is_integer(v))
		return (int64_t)json_integer_value(v);
	if (json_is_real(v))
		return (int64_t)json_real_value(v);
	return 0;
}

static const char *jstr(json_t *obj, const char *k)
{
	const char *s = json_string_value(json_object_get(obj, k));

	return s ? s : "";
}

/* compact JSON of v ("null" when absent); caller frees */
static char *jdump(json_t *v)
{
	char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;

	return s ? s : hub_xstrdup("null");
}

static void print_json_line(json_t *v)
{
	char *s = jdump(v);

	puts(s);
	fflush(stdout);
	free(s);
}

static const char *net_what(int r)
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
static int report_net(int r)
{
	if (r == E_INTR) {
		fprintf(stderr, "hubctl: interrupted\n");
		return EX_INTERRUPTED;
	}
	fprintf(stderr, "hubctl: %s\n", o.err[0] ? o.err : "the hub is unreachable");
	if (o.json) {
		json_t *e = json_pack("{s:{s:s,s:s}}", "error", "code", net_what(r),
				      "message", o.err);

		print_json_line(e);
		json_decref(e);
	}
	return EX_UNREACHABLE;
}

/* an HTTP answer >= 300: the hub's error, --json document, exit code */
static int report_http_error(const struct http_resp *rs)
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
		char snip[201];

		for (size_t i = 0; i < n; i++)
			snip[i] = isprint((unsigned char)rs->body[i]) ? rs->body[i] : ' ';
		snip[n] = '\0';
		fprintf(stderr, "hubctl: HTTP %d from the hub%s%s\n", rs->status,
			n ? ": " : "", snip);
	}
	if (o.json) {
		json_t *e = json_pack("{s:i}", "status", rs->status);

		if (err)
			json_object_set(e, "error", err);
		else
			json_object_set_new(e, "error", json_pack("{s:s,s:s}", "code",
				rs->status >= 500 ? "server_error" : "http_error",
				"message", "no JSON error body"));
		print_json_line(e);
		json_decref(e);
	}
	json_decref(doc);
	return rs->status >= 500 || rs->status < 400 ? EX_UNREACHABLE : EX_HTTP_4XX;
}

/*
 * A JSON API call. Returns EX_OK with *out (caller decrefs) and *status (may
 * be NULL), or the exit code after reporting the failure.
 */
static int api(const char *method, const char *path, const char *body, const char *idem,
	       json_t **out, int *status)
{
	struct http_resp rs;
	json_error_t je;
	int r, ex;

	*out = NULL;
	o.err[0] = '\0';
	if (o.verbose)
		fprintf(stderr, "hubctl: %s %s%s\n", method,
			strcmp(o.url.path, "/") ? o.url.path : "", path);
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
	*out = json_loadb(rs.body, rs.len, 0, &je);
	free(rs.body);
	if (!*out) {
		set_err("the hub answered %s %s with invalid JSON: %s", method, path, je.text);
		return report_net(E_PROTO);
	}
	return EX_OK;
}

/*
 * POSTs body (taken) to path, to create what ("command", "rollout"): EX_OK
 * with *doc (caller decrefs; it has a string "id") and *status (may be
 * NULL), or the exit code after reporting the failure.
 */
static int create(const char *path, json_t *body, const char *idem, const char *what,
		  json_t **doc, int *status)
{
	char *bs = json_dumps(body, JSON_COMPACT);
	int ex = api("POST", path, bs, idem, doc, status);

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
static int command_api(const char *id, int cancel, json_t **out)
{
	hub_buf p = { 0 };
	int ex;

	hub_buf_puts(&p, "/v1/commands/");
	urlenc(&p, id);
	if (cancel)
		hub_buf_puts(&p, "/cancel");
	ex = api(cancel ? "POST" : "GET", p.data, cancel ? "{}" : NULL, NULL, out, NULL);
	hub_buf_free(&p);
	return ex;
}

static int fetch_command(const char *id, json_t **out)
{
	return command_api(id, 0, out);
}

/* "/v1/devices/{device}/commands" */
static void device_commands(hub_buf *p, const char *device)
{
	hub_buf_puts(p, "/v1/devices/");
	urlenc(p, device);
	hub_buf_puts(p, "/commands");
}

/* ------------------------------------------------------------------------ */
/* the dashboard stream                                                       */

struct wmsg {
	struct wmsg *next;
	size_t len;
	char data[];
};

/* an open stream: the user of its connection */
struct ws {
	struct hc_conn *c;             /* NULL once closed */
	struct wmsg *head, *tail;      /* received, not yet read */
	int wake, opened, closed, big, status, close_code;
	char *error, *body;            /* how it failed; a refused upgrade's body */
};

static void ws_open_cb(struct hc_conn *c, void *user)
{
	struct ws *w = user;

	w->opened = w->wake = 1;
}

static void ws_msg_cb(struct hc_conn *c, const char *m, size_t n, void *user)
{
	struct ws *w = user;
	struct wmsg *q;

	w->wake = 1;
	if (!m) {
		w->big = 1;
		hc_close(c, 1009, "message too large");
		return;
	}
	q = hub_xmalloc(sizeof(*q) + n + 1);
	q->next = NULL;
	q->len = n;
	memcpy(q->data, m, n);
	q->data[n] = '\0';
	if (w->tail)
		w->tail->next = q;
	else
		w->head = q;
	w->tail = q;
}

static void ws_close_cb(struct hc_conn *c, const struct hc_end *e, void *user)
{
	struct ws *w = user;

	w->c = NULL;
	w->wake = w->closed = 1;
	w->status = e->status;
	w->close_code = e->close_code ? e->close_code : 1006;
	w->error = e->error ? hub_xstrdup(e->error) : NULL;
	w->body = e->body ? strndup(e->body, e->body_len) : NULL;
}

static const struct hc_cbs ws_cbs = { ws_open_cb, ws_msg_cb, NULL, ws_close_cb };

static void ws_free(struct ws *w)
{
	while (w->head) {
		struct wmsg *q = w->head;

		w->head = q->next;
		free(q);
	}
	free(w->error);
	free(w->body);
	free(w);
}

/* closes the stream politely (half a second at most) and frees it */
static void ws_close(struct ws *w)
{
	if (!w)
		return;
	if (w->c) {
		hc_close(w->c, 1000, NULL);
		hc_wait(o.x, &w->closed, hub_mono_us() + 500000);
		if (w->c)   /* hc_wait ends early after Ctrl-C */
			hc_abort(w->c);
	}
	ws_free(w);
}

/*
 * Upgrades GET <path> to a WebSocket with header auth. Returns the ws, or
 * NULL with *status = the HTTP status (> 0, *err_body its body) or E_*.
 */
static struct ws *ws_open(const char *path, int *status, char **err_body)
{
	struct ws *w = hub_xcalloc(1, sizeof(*w));
	const struct hc_conn_opts co = {
		.url = &o.url, .path = path, .subprotocol = CTL_SUBPROTOCOL,
		.auth = o.auth, .insecure = o.insecure, .max_message = CTL_WS_MSG_MAX,
		.cb = &ws_cbs, .user = w,
	};
	int r;

	*status = 0;
	*err_body = NULL;
	w->c = hc_connect(o.x, &co);
	r = w->c ? 0 : E_NET;
	while (!r && !w->opened && w->c)
		r = waited(hc_wait(o.x, &w->wake, req_deadline()));
	w->wake = 0;
	if (!r && w->opened)
		return w;
	if (!r && w->status && w->status != 101) {
		*status = w->status;
		*err_body = w->body;
		w->body = NULL;
	} else {
		if (r == E_TIMEOUT)
			set_err("the WebSocket upgrade at %s:%d timed out", o.url.host, o.url.port);
		else if (r != E_INTR)
			set_err("cannot connect to %s:%d%s%s", o.url.host, o.url.port,
				w->error ? ": " : "", w->error ? w->error : "");
		*status = r ? r : E_NET;
	}
	if (w->c)
		hc_abort(w->c);
	ws_free(w);
	return NULL;
}

static int ws_send_json(struct ws *w, json_t *msg)
{
	char *s = json_dumps(msg, JSON_COMPACT);
	int r = s && w->c && !hc_send(w->c, s, strlen(s)) ? 0 : E_NET;

	if (r)
		set_err("cannot send to the hub's stream");
	free(s);
	return r;
}

/*
 * Next text message: 1 with *msg (caller frees), 0 when the hub closed
 * (w->close_code), or E_* (E_TIMEOUT at deadline, 0: none).
 */
static int ws_recv(struct ws *w, char **msg, size_t *len, int64_t deadline)
{
	for (;;) {
		struct wmsg *q = w->head;
		int r;

		if (q) {
			w->head = q->next;
			if (!w->head)
				w->tail = NULL;
			*len = q->len;
			*msg = memmove(q, q->data, q->len + 1);
			return 1;
		}
		if (w->big) {
			set_err("a stream message is over %u bytes", CTL_WS_MSG_MAX);
			return E_BIG;
		}
		if (!w->c)
			return 0;
		w->wake = 0;
		r = waited(hc_wait(o.x, &w->wake, deadline));
		if (r)
			return r;
	}
}

/* a transport failure r of the stream: reported (unless quiet); the exit code */
static int stream_net_fail(int r, int quiet)
{
	if (!quiet)
		return report_net(r);
	return r == E_INTR ? EX_INTERRUPTED : EX_UNREACHABLE;
}

/*
 * Opens /v1/stream and subscribes. Returns the ws, or NULL with the exit
 * code in *ex (reported unless quiet).
 */
static struct ws *stream_subscribe(json_t *sub, int quiet, int *ex)
{
	int64_t deadline = req_deadline();
	char *body = NULL, *msg;
	size_t len;
	struct ws *w;
	int st, r;

	*ex = EX_OK;
	o.err[0] = '\0';
	w = ws_open("/v1/stream", &st, &body);
	if (!w) {
		if (st > 0 && quiet) {
			set_err("the stream upgrade got HTTP %d", st);
			*ex = st >= 500 ? EX_UNREACHABLE : EX_HTTP_4XX;
		} else if (st > 0) {
			struct http_resp rs = { st, body, body ? strlen(body) : 0 };

			*ex = report_http_error(&rs);
		} else {
			*ex = stream_net_fail(st, quiet);
		}
		free(body);
		return NULL;
	}
	if ((r = ws_send_json(w, sub)))
		goto net;
	for (;;) {
		json_t *m;
		const char *type;

		r = ws_recv(w, &msg, &len, deadline);
		if (r == 0) {
			set_err("the hub closed the stream (code %d)", w->close_code);
			r = E_NET;
		}
		if (r <= 0) {
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
/* commands: formatting                                                       */

static const char *const ALL_STATES[] = {
	"queued", "sent", "received", "in_progress", "succeeded", "failed",
	"rejected", "timed_out", "expired", "canceled", NULL
};

static int state_index(const char *st)
{
	for (int i = 0; ALL_STATES[i]; i++)
		if (!strcmp(st, ALL_STATES[i]))
			return i;
	return -1;
}

static int is_final(const char *st)
{
	return state_index(st) >= 4;
}

/* lifecycle order: queued 0, sent 1, received 2, in_progress 3, final 4 */
static int state_rank(const char *st)
{
	int i = state_index(st);

	return i > 4 ? 4 : i;
}

/* what follows the status in a transition line (send --wait, tail):
 * " (attempt N)" when sent, " P%", " message", ": error" */
static void print_status_details(json_t *ev)
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
static void print_result(json_t *c, const char *lead)
{
	json_t *res = json_object_get(c, "result");

	if (res && !json_is_null(res)) {
		char *s = jdump(res);

		printf("%s%s", lead, s);
		free(s);
	}
}

/* one transition line (human): "HH:MM:SS.mmm status details" */
static void print_transition_human(json_t *ev)
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
static void print_stamps(json_t *v)
{
	char t[40];

	fmt_ms(jint(v, "created_at"), 1, t, sizeof(t));
	printf("  created   %s\n", t);
	fmt_ms(jint(v, "updated_at"), 1, t, sizeof(t));
	printf("  updated   %s\n", t);
}

static void print_command_human(json_t *c)
{
	static const char *const fields[] = { "params", "progress", "message",
					       "result", "error", NULL };
	json_t *h = json_object_get(c, "history"), *e;
	char t[40];
	size_t k;

	printf("%s  %s on %s (%s)\n", jstr(c, "id"), jstr(c, "name"), jstr(c, "device"),
	       jstr(c, "device_type"));
	printf("  status    %s (attempt %" PRId64 "/%" PRId64 ")\n", jstr(c, "status"),
	       jint(c, "attempt"), jint(c, "max_attempts"));
	for (int i = 0; fields[i]; i++) {
		json_t *v = json_object_get(c, fields[i]);

		if (v && !json_is_null(v) && !(json_is_object(v) && !json_object_size(v))) {
			char *s = json_is_string(v) ? hub_xstrdup(json_string_value(v)) : jdump(v);

			printf("  %-9s %s\n", fields[i], s);
			free(s);
		}
	}
	print_stamps(c);
	printf("  limits    ack_timeout %" PRId64 "s, timeout %" PRId64 "s, ttl %"
	       PRId64 "s\n", jint(c, "ack_timeout_s"), jint(c, "timeout_s"),
	       jint(c, "ttl_s"));
	if (json_is_array(h))
		printf("  history\n");
	json_array_foreach(h, k, e) {
		printf("    ");
		if (json_is_false(json_object_get(e, "applied"))) {
			fmt_ms(jint(e, "at"), 0, t, sizeof(t));
			printf("%s  (%s, not applied)\n", t, jstr(e, "status"));
		} else {
			print_transition_human(e);
		}
	}
	fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* send --wait                                                                */

struct tracker {
	char *id;
	char status[32];
	int rank;
	int64_t attempt;
	int64_t progress;   /* -1 none */
	int64_t last_at;
	int final;
};

/* prints ev if it moves the command forward (or updates progress/attempt) */
static void track_event(struct tracker *t, json_t *ev)
{
	const char *st = jstr(ev, "status");
	int rank = state_rank(st), show;
	int64_t att = jint(ev, "attempt");
	int64_t pr = json_is_number(json_object_get(ev, "progress")) ? jint(ev, "progress") : -1;

	if (rank < 0 || t->final)
		return;
	if (rank != t->rank)
		show = rank > t->rank;
	else if (!strcmp(st, "sent"))
		show = att > t->attempt;
	else
		show = !strcmp(st, "in_progress") && pr >= 0 && pr != t->progress;
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
static json_t *status_event(json_t *c)
{
	return json_pack("{s:s,s:s,s:s,s:s}", "type", "command_status", "id",
			 jstr(c, "id"), "device", jstr(c, "device"), "name",
			 jstr(c, "name"));
}

/* applies a fetched command: its history entries after what was shown, then
 * the current state, whatever the history showed */
static void track_command(struct tracker *t, json_t *c)
{
	json_t *h = json_object_get(c, "history"), *e, *ev;
	const char *k;
	json_t *v;
	size_t i;

	json_array_foreach(h, i, e) {
		if (json_is_false(json_object_get(e, "applied")) || jint(e, "at") < t->last_at)
			continue;
		ev = status_event(c);
		json_object_foreach(e, k, v)
			if (strcmp(k, "applied"))
				json_object_set(ev, k, v);
		if (!json_object_get(ev, "attempt"))
			json_object_set_new(ev, "attempt", json_integer(jint(c, "attempt")));
		track_event(t, ev);
		json_decref(ev);
	}
	ev = status_event(c);
	json_object_set_new(ev, "status", json_string(jstr(c, "status")));
	json_object_set_new(ev, "at", json_integer(jint(c, "updated_at")));
	json_object_set_new(ev, "attempt", json_integer(jint(c, "attempt")));
	if (json_is_number(json_object_get(c, "progress")))
		json_object_set(ev, "progress", json_object_get(c, "progress"));
	track_event(t, ev);
	json_decref(ev);
}

/* fetches the command and shows what it has that was not shown; 0 or the
 * exit code */
static int catch_up(struct tracker *t)
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
static int finish_wait(struct tracker *t)
{
	json_t *c;
	int ex = fetch_command(t->id, &c);
	const char *st;

	if (ex)
		return ex;
	track_command(t, c);   /* in case the stream missed the last step */
	st = jstr(c, "status");
	if (o.json) {
		print_json_line(c);
	} else {
		const char *err = json_string_value(json_object_get(c, "error"));

		printf("%s %s", jstr(c, "id"), st);
		if (err)
			printf(": %s", err);
		print_result(c, " result ");
		putchar('\n');
	}
	ex = !is_final(st) ? EX_WAIT_TIMEOUT : strcmp(st, "succeeded") ? EX_CMD_FAILED : EX_OK;
	json_decref(c);
	return ex;
}

/*
 * A --wait (send, send-fleet) that gives up at the --timeout deadline: a line
 * on stderr, "what id is status" and extra, and with --json the wait_timeout
 * document with message. Returns EX_WAIT_TIMEOUT.
 */
static int wait_timed_out(const char *what, const char *id, const char *status,
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
static int wait_interrupted(const char *what, const char *id, const char *status,
			    const char *extra)
{
	fflush(stdout);
	fprintf(stderr, "hubctl: interrupted; %s %s is %s%s\n", what, id, status, extra);
	return EX_INTERRUPTED;
}

/* one message of the status stream: a transition of ours, or a gap (catch
 * up from the command); 0 or the exit code */
static int follow_msg(struct tracker *t, const char *msg, size_t len)
{
	json_t *m = json_loadb(msg, len, 0, NULL);
	const char *type = jstr(m, "type");
	int ex = EX_OK;

	if (!strcmp(type, "command_status") && !strcmp(jstr(m, "id"), t->id))
		track_event(t, m);
	else if (!strcmp(type, "gap"))
		ex = catch_up(t);   /* events were lost */
	json_decref(m);
	return ex;
}

/* follows the command until final (then prints it) or the deadline, on the
 * stream w while it lasts, then by polling */
static int follow(struct tracker *t, struct ws *w)
{
	int64_t next_poll = 0;
	int ex = EX_OK;

	while (!t->final && !ex) {
		int64_t now = hub_mono_us();
		char *msg;
		size_t len;
		int r;

		if (interrupted()) {
			ex = wait_interrupted("command", t->id, t->status, "");
		} else if (o.deadline && now >= o.deadline) {
			ex = wait_timed_out("command", t->id, t->status, "",
					    "the command did not reach a final state in time");
		} else if (w) {
			r = ws_recv(w, &msg, &len, until_deadline(now + 1000000));
			if (r == 1) {
				ex = follow_msg(t, msg, len);
				free(msg);
			} else if (r != E_TIMEOUT && r != E_INTR) {
				fprintf(stderr, "hubctl: the status stream %s; polling instead\n",
					r == 0 ? "closed" : "failed");
				ws_close(w);
				w = NULL;
				next_poll = 0;
			}
		} else if (now < next_poll) {
			nap_until(next_poll);
		} else {
			ex = catch_up(t);
			next_poll = hub_mono_us() + CTL_POLL_INTERVAL;
		}
	}
	ws_close(w);
	return ex ? ex : finish_wait(t);
}

static int cmd_send(void)
{
	const char *device = o.pos[0], *name = o.pos[1];
	json_t *doc = NULL;
	struct ws *w = NULL;
	hub_buf path = { 0 };
	struct tracker t = { 0 };
	int ex, status = 0;

	if (!device || !name)
		opts_die("send: expected DEVICE NAME");
	if (!*device || !*name)
		opts_die("send: DEVICE and NAME must not be empty");
	if (json_object_set_new(o.body, "name", json_string(name)))
		opts_die("send: NAME is not valid UTF-8");

	if (o.wait) {
		/* subscribe before creating, so no transition can be missed */
		json_t *sub = json_pack("{s:s,s:s,s:s,s:{s:[s]}}", "type", "subscribe",
					"id", "hubctl-wait", "stream", "commands",
					"filter", "devices", device);

		w = stream_subscribe(sub, 1, &ex);
		json_decref(sub);
		if (!w && ex == EX_INTERRUPTED)
			return ex;
		if (!w)
			fprintf(stderr, "hubctl: no status stream (%s); polling the "
				"command instead\n", o.err[0] ? o.err : "unavailable");
	}

	device_commands(&path, device);
	ex = create(path.data, o.body, o.idem, "command", &doc, &status);
	hub_buf_free(&path);
	if (ex) {
		ws_close(w);
		return ex;
	}
	if (o.json)
		print_json_line(doc);
	else if (!o.wait)
		printf("%s %s%s\n", jstr(doc, "id"), jstr(doc, "status"),
		       status == 200 ? " (existing command: same Idempotency-Key)" : "");
	else
		printf("%s  %s on %s%s\n", jstr(doc, "id"), jstr(doc, "name"),
		       jstr(doc, "device"),
		       status == 200 ? " (existing command: same Idempotency-Key)" : "");
	fflush(stdout);
	if (!o.wait) {
		json_decref(doc);
		return EX_OK;
	}

	t.id = hub_xstrdup(jstr(doc, "id"));
	t.rank = -1;
	t.progress = -1;
	snprintf(t.status, sizeof(t.status), "%s", jstr(doc, "status"));
	if (json_is_array(json_object_get(doc, "history"))) {
		track_command(&t, doc);
		ex = EX_OK;
	} else {
		ex = catch_up(&t);   /* no history in the answer: ask the hub */
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

static const char *const FAILED_STATES[] = {
	"failed", "rejected", "timed_out", "expired", NULL
};

/* "succeeded 2, in_progress 1, queued 5": counts in lifecycle order (then
 * any state this hubctl does not know), zero counts left out */
static void counts_text(hub_buf *b, json_t *counts, const char *sep)
{
	const char *k;
	json_t *v;
	int n = 0;

	for (int s = 0; ALL_STATES[s]; s++) {
		v = json_object_get(counts, ALL_STATES[s]);
		if (json_is_integer(v) && json_integer_value(v))
			hub_buf_printf(b, "%s%s %" PRId64, n++ ? sep : "", ALL_STATES[s],
				       (int64_t)json_integer_value(v));
	}
	json_object_foreach(counts, k, v)
		if (state_index(k) < 0 && json_is_integer(v))
			hub_buf_printf(b, "%s%s %" PRId64, n++ ? sep : "", k,
				       (int64_t)json_integer_value(v));
	if (!n)
		hub_buf_puts(b, "no commands");
}

/* "site=b1,floor=2" (or "-") */
static void labels_text(hub_buf *b, json_t *labels)
{
	const char *k;
	json_t *v;
	int n = 0;

	json_object_foreach(labels, k, v)
		hub_buf_printf(b, "%s%s=%s", n++ ? "," : "", k,
			       json_is_string(v) ? json_string_value(v) : "?");
	if (!n)
		hub_buf_puts(b, "-");
}

/* 0: completed without failures; 1: aborted, or any failed/rejected/
 * timed_out/expired command */
static int rollout_exit(json_t *r)
{
	int64_t failures = 0;

	for (int s = 0; FAILED_STATES[s]; s++)
		failures += jint(json_object_get(r, "counts"), FAILED_STATES[s]);
	return !strcmp(jstr(r, "status"), "completed") && !failures ? EX_OK : EX_CMD_FAILED;
}

/* the progress line (no newline): "HH:MM:SS  running  released 3/8  queued 5 ..." */
static char *rollout_progress(json_t *r)
{
	hub_buf b = { 0 };
	char t[32];

	fmt_ms(jint(r, "updated_at"), 0, t, sizeof(t));
	hub_buf_printf(&b, "%s  %-9s released %" PRId64 "/%" PRId64 "  ", t,
		       jstr(r, "status"), jint(r, "released"), jint(r, "total"));
	counts_text(&b, json_object_get(r, "counts"), "  ");
	return b.data;
}

static void print_rollout_human(json_t *r)
{
	hub_buf b = { 0 };
	json_t *params = json_object_get(r, "params"), *ratio;
	double q;

	labels_text(&b, json_object_get(r, "labels"));
	printf("%s  %s on %s devices (labels %s)\n", jstr(r, "id"), jstr(r, "name"),
	       jstr(r, "device_type"), b.data);
	printf("  status    %s\n", jstr(r, "status"));
	printf("  released  %" PRId64 "/%" PRId64 " at %" PRId64 "/min\n",
	       jint(r, "released"), jint(r, "total"), jint(r, "max_per_minute"));
	ratio = json_object_get(r, "abort_failure_ratio");
	q = json_is_number(ratio) ? json_number_value(ratio) : 1;
	if (q >= 1)
		printf("  abort     never (abort_failure_ratio 1)\n");
	else
		printf("  abort     when failures exceed %g of the finished "
		       "(after %" PRId64 " finished)\n", q, jint(r, "min_finished"));
	if (params && !(json_is_object(params) && !json_object_size(params))) {
		char *s = jdump(params);

		printf("  params    %s\n", s);
		free(s);
	}
	b.len = 0;
	counts_text(&b, json_object_get(r, "counts"), ", ");
	printf("  counts    %s\n", b.data);
	hub_buf_free(&b);
	print_stamps(r);
	fflush(stdout);
}

/*
 * Follows a rollout until completed or aborted: GET once a second; a line
 * each time it changed (rewritten in place on a terminal), the rollout as
 * JSON with --json. Takes r (the last document seen).
 */
static int follow_rollout(const char *id, json_t *r)
{
	int tty = !o.json && isatty(STDOUT_FILENO), line_open = 0, late, ex;
	char *last = NULL, released[64];

	for (;;) {
		const char *st = jstr(r, "status");
		char *now_s = o.json ? jdump(r) : rollout_progress(r);

		if (!last || strcmp(now_s, last)) {
			if (tty) {
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
		if (strcmp(st, "running")) {
			if (line_open)
				putchar('\n');
			if (!o.json) {
				hub_buf b = { 0 };

				counts_text(&b, json_object_get(r, "counts"), ", ");
				printf("%s %s: %s\n", jstr(r, "id"), st, b.data);
				hub_buf_free(&b);
			}
			ex = rollout_exit(r);
			break;
		}
		nap_until(hub_mono_us() + CTL_FLEET_POLL);
		snprintf(released, sizeof(released), " (released %" PRId64 "/%" PRId64 ")",
			 jint(r, "released"), jint(r, "total"));
		/* too close to --timeout for one more request: give up */
		late = o.deadline && o.deadline - hub_mono_us() < 100000;
		if (line_open && (interrupted() || late))
			putchar('\n');
		if (interrupted()) {
			ex = wait_interrupted("rollout", id, st, released);
			break;
		}
		if (late) {
			ex = wait_timed_out("rollout", id, st, released,
					    "the rollout did not complete in time");
			break;
		}
		fflush(stdout);   /* a diagnostic of the GET must not land mid-line */
		json_decref(r);
		ex = fetch_command(id, &r);
		if (ex) {
			if (line_open)
				putchar('\n');
			r = NULL;
			break;
		}
	}
	free(last);
	json_decref(r);
	fflush(stdout);
	return ex;
}

/* --params JSON or --params @FILE: the parsed value (caller owns it); a usage
 * error when over CTL_PARAMS_MAX or not JSON */
static json_t *parse_params(const char *params)
{
	json_error_t je;
	char *text = NULL;
	size_t n;
	json_t *pj;

	if (params[0] == '@' && !(text = hub_read_file(params + 1, CTL_PARAMS_MAX, &n)))
		opts_die("--params %s: %s", params + 1, errno == EFBIG ? "over 64 KiB" :
			  strerror(errno));
	if (!text && strlen(params) > CTL_PARAMS_MAX)
		opts_die("--params: over %u bytes", CTL_PARAMS_MAX);
	pj = json_loads(text ? text : params, JSON_DECODE_ANY, &je);
	free(text);
	if (!pj)
		opts_die("--params: not JSON: %s (line %d, column %d)", je.text, je.line,
			  je.column);
	return pj;
}

static int cmd_send_fleet(void)
{
	const char *name = o.pos[0];
	json_t *doc = NULL, *target = json_object(), *r;
	int ex;
	char *id;

	if (!o.type || !*o.type)
		opts_die("send-fleet: --type T is required");
	if (!name || !*name)
		opts_die("send-fleet: expected NAME");
	if (json_object_set_new(target, "device_type", json_string(o.type)))
		opts_die("send-fleet: --type is not valid UTF-8");
	if (o.labels)
		json_object_set(target, "labels", o.labels);
	json_object_set_new(o.body, "target", target);
	if (json_object_set_new(o.body, "name", json_string(name)))
		opts_die("send-fleet: NAME is not valid UTF-8");
	if (json_object_size(o.ro))
		json_object_set(o.body, "rollout", o.ro);

	ex = create("/v1/commands", o.body, NULL, "rollout", &doc, NULL);
	if (ex)
		return ex;
	if (o.json) {
		print_json_line(doc);
	} else if (!o.wait) {
		printf("%s %s %" PRId64 " device(s)\n", jstr(doc, "id"), jstr(doc, "status"),
		       jint(doc, "total"));
	} else {
		hub_buf b = { 0 };

		labels_text(&b, json_object_get(doc, "labels"));
		printf("%s  %s on %" PRId64 " %s device(s) (labels %s) at %" PRId64 "/min\n",
		       jstr(doc, "id"), jstr(doc, "name"), jint(doc, "total"),
		       jstr(doc, "device_type"), b.data, jint(doc, "max_per_minute"));
		hub_buf_free(&b);
	}
	fflush(stdout);
	if (!o.wait) {
		json_decref(doc);
		return EX_OK;
	}
	id = hub_xstrdup(jstr(doc, "id"));
	if (!o.json) {
		ex = follow_rollout(id, doc);
	} else {
		/* the 202 body was printed; follow from the next GET */
		json_decref(doc);
		ex = fetch_command(id, &r);
		if (!ex)
			ex = follow_rollout(id, r);
	}
	free(id);
	return ex;
}

/* ------------------------------------------------------------------------ */
/* show, cancel, list-commands, devices                                       */

static int cmd_show_cancel(int cancel)
{
	const char *id = o.pos[0];
	json_t *c;
	int ex;

	if (!id || !*id)
		opts_die("%s: expected a command ID", o.cmd);
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
		print_command_human(c);
	json_decref(c);
	return EX_OK;
}

static int cmd_show(void)
{
	return cmd_show_cancel(0);
}

static int cmd_cancel(void)
{
	return cmd_show_cancel(1);
}

/* POST /v1/commands/ID/ACTION (pause, resume: a rollout). */
static int rollout_action(const char *action)
{
	const char *id = o.pos[0];
	hub_buf p = { 0 };
	json_t *r = NULL;
	int ex;

	if (!id || !*id)
		opts_die("%s: expected a rollout ID", o.cmd);
	hub_buf_puts(&p, "/v1/commands/");
	urlenc(&p, id);
	hub_buf_puts(&p, "/");
	hub_buf_puts(&p, action);
	ex = api("POST", p.data, "{}", NULL, &r, NULL);
	hub_buf_free(&p);
	if (ex)
		return ex;
	if (o.json)
		print_json_line(r);
	else
		printf("%s %s\n", jstr(r, "id"), jstr(r, "status"));
	json_decref(r);
	return EX_OK;
}

static int cmd_pause(void)
{
	return rollout_action("pause");
}

static int cmd_resume(void)
{
	return rollout_action("resume");
}

static int cmd_show_rollout(void)
{
	if (!o.pos[0] || !*o.pos[0])
		opts_die("show-rollout: expected a rollout ID");
	if (strncmp(o.pos[0], "r_", 2))
		opts_die("show-rollout: a rollout ID starts with r_ (show ID for a command)");
	return cmd_show_cancel(0);
}

/* "?a=b&c=d" onto path: sep is "?" before the first */
static void query(hub_buf *p, const char **sep, const char *k, const char *v)
{
	hub_buf_printf(p, "%s%s=", *sep, k);
	urlenc(p, v);
	*sep = "&";
}

/* GET path (it is freed), then --json: the document; else row(NULL) (the
 * header), row() of each member of the array key, and more when the answer
 * says it was truncated */
static int list(hub_buf *path, const char *key, void (*row)(json_t *item), const char *more)
{
	json_t *doc, *item;
	size_t k;
	int ex = api("GET", path->data, NULL, NULL, &doc, NULL);

	hub_buf_free(path);
	if (ex)
		return ex;
	if (o.json) {
		print_json_line(doc);
	} else {
		row(NULL);
		json_array_foreach(json_object_get(doc, key), k, item)
			row(item);
		if (more && json_is_true(json_object_get(doc, "truncated")))
			puts(more);
	}
	json_decref(doc);
	return EX_OK;
}

static void command_row(json_t *c)
{
	char t[40], att[48];

	if (!c) {
		printf("%-34s %-12s %-18s %-7s %s\n", "ID", "STATUS", "NAME", "ATTEMPT", "CREATED");
		return;
	}
	fmt_ms(jint(c, "created_at"), 1, t, sizeof(t));
	snprintf(att, sizeof(att), "%" PRId64 "/%" PRId64, jint(c, "attempt"),
		 jint(c, "max_attempts"));
	printf("%-34s %-12s %-18s %-7s %s\n", jstr(c, "id"), jstr(c, "status"),
	       jstr(c, "name"), att, t);
}

static int cmd_list(void)
{
	hub_buf p = { 0 };
	const char *sep = "?";
	char lim[24];

	if (!o.pos[0] || !*o.pos[0])
		opts_die("list-commands: expected DEVICE");
	device_commands(&p, o.pos[0]);
	if (o.status)
		query(&p, &sep, "status", o.status);
	snprintf(lim, sizeof(lim), "%ld", o.limit);
	if (o.limit)
		query(&p, &sep, "limit", lim);
	return list(&p, "commands", command_row, NULL);
}

static void device_row(json_t *d)
{
	char t[40], *l;

	if (!d) {
		printf("%-24s %-14s %-7s %-16s %-23s %s\n", "DEVICE", "TYPE", "ONLINE",
		       "GATEWAY", "LAST_SEEN", "LABELS");
		return;
	}
	l = jdump(json_object_get(d, "labels"));
	fmt_ms(jint(d, "last_seen"), 1, t, sizeof(t));
	printf("%-24s %-14s %-7s %-16s %-23s %s\n", jstr(d, "device"),
	       jstr(d, "device_type"), json_is_true(json_object_get(d, "online")) ? "yes" : "no",
	       json_is_string(json_object_get(d, "gateway")) ? jstr(d, "gateway") : "-", t, l);
	free(l);
}

static int cmd_devices(void)
{
	hub_buf p = { 0 };
	const char *sep = "?", *k;
	char lim[24];
	json_t *v;

	hub_buf_puts(&p, "/v1/devices");
	if (o.type)
		query(&p, &sep, "device_type", o.type);
	if (o.online)
		query(&p, &sep, "online", o.online);
	snprintf(lim, sizeof(lim), "%ld", o.limit);
	if (o.limit)
		query(&p, &sep, "limit", lim);
	json_object_foreach(o.labels, k, v) {
		hub_buf_printf(&p, "%slabel.", sep);
		urlenc(&p, k);
		hub_buf_puts(&p, "=");
		urlenc(&p, json_string_value(v));
		sep = "&";
	}
	return list(&p, "devices", device_row,
		    "(more devices match: narrow the filter or raise --limit)");
}

/* ------------------------------------------------------------------------ */
/* tail                                                                       */

/*
 * The text of a stream message, read without re-encoding it: jansson would
 * print 21.55 back as 21.550000000000001, and tail promises what the hub sent.
 * jraw_next walks the members of one JSON object's text (kept as the hub wrote
 * it); the message was parsed by jansson first, so it is valid JSON.
 */
static const char *jraw_ws(const char *p, const char *e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* the end of the JSON value that starts at p (p itself if none) */
static const char *jraw_skip(const char *p, const char *e)
{
	int depth = 0;

	do {
		if (p >= e)
			return e;
		if (*p == '"') {
			for (p++; p < e && *p != '"'; p++)
				if (*p == '\\')
					p++;
			p++;
		} else if (*p == '{' || *p == '[') {
			depth++;
			p++;
		} else if (*p == '}' || *p == ']') {
			depth--;
			p++;
		} else if (depth && (*p == ',' || *p == ':' || *p == ' ' || *p == '\t' ||
				     *p == '\n' || *p == '\r')) {
			p++;
		} else {
			while (p < e && !strchr(",:]} \t\n\r", *p))
				p++;
		}
	} while (depth > 0);
	return p;
}

/* Next member of the object text at *p (start: just after its '{'): 1 with
 * the key (without quotes) and the value's text, 0 at the end. */
static int jraw_next(const char **p, const char *e, const char **k, size_t *kl,
		     const char **v, size_t *vl)
{
	const char *q = jraw_ws(*p, e);

	if (q < e && *q == ',')
		q = jraw_ws(q + 1, e);
	if (q >= e || *q != '"')
		return 0;
	*k = q + 1;
	q = jraw_skip(q, e);
	*kl = (size_t)(q - 1 - *k);
	q = jraw_ws(q, e);
	if (q < e && *q == ':')
		q = jraw_ws(q + 1, e);
	*v = q;
	q = jraw_skip(q, e);
	*vl = (size_t)(q - *v);
	*p = q;
	return 1;
}

/* the text of member key of the object text [o, e), NULL when absent */
static const char *jraw_get(const char *obj, const char *e, const char *key, size_t *vl)
{
	const char *p = jraw_ws(obj, e), *k, *v;
	size_t kl;

	if (p >= e || *p != '{')
		return NULL;
	p++;
	while (jraw_next(&p, e, &k, &kl, &v, vl))
		if (kl == strlen(key) && !memcmp(k, key, kl))
			return v;
	return NULL;
}

/* the message without its "sub" member, as the hub wrote the rest */
static void print_raw_without_sub(const char *msg, size_t len)
{
	const char *e = msg + len, *p = jraw_ws(msg, e), *k, *v;
	size_t kl, vl;
	int n = 0;

	if (p >= e || *p != '{') {
		printf("%.*s\n", (int)len, msg);
		return;
	}
	p++;
	putchar('{');
	while (jraw_next(&p, e, &k, &kl, &v, &vl)) {
		if (kl == 3 && !memcmp(k, "sub", 3))
			continue;
		printf("%s\"%.*s\":%.*s", n++ ? "," : "", (int)kl, k, (int)vl, v);
	}
	puts("}");
	fflush(stdout);
}

static void print_stream_human(json_t *m, const char *raw, size_t rawlen)
{
	const char *re = raw + rawlen, *rv, *k, *v, *mp, *me;
	size_t rl, kl, vl;

	const char *type = jstr(m, "type");
	json_t *g = json_object_get(m, "group");
	char t[32], *s;

	if (!strcmp(type, "reading")) {
		rv = jraw_get(raw, re, "data", &rl);
		fmt_ms(jint(m, "ts"), 0, t, sizeof(t));
		printf("%s  %-20s %.*s  pos %s\n", t, jstr(m, "device"), rv ? (int)rl : 4,
		       rv ? rv : "null", jstr(m, "pos"));
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
		rv = jraw_get(raw, re, "result", &rl);
		if (rv && !(rl == 4 && !memcmp(rv, "null", 4)))
			printf(" %.*s", (int)rl, rv);
		putchar('\n');
	} else if (!strcmp(type, "aggregate")) {
		fmt_ms(jint(m, "start"), 0, t, sizeof(t));
		printf("%s  %-20s %s", t, g ? "(group)" : jstr(m, "device"), jstr(m, "window"));
		if (g) {
			s = jdump(g);
			printf(" %s", s);
			free(s);
		}
		mp = jraw_get(raw, re, "metrics", &rl);
		if (mp && *mp == '{') {
			me = mp + rl;
			mp++;
			while (jraw_next(&mp, me, &k, &kl, &v, &vl)) {
				static const char *const st[] = { "count", "min", "max", "avg", "last" };
				static const char *const lab[] = { " n=", " min=", " max=", " avg=", " last=" };

				printf("  %.*s", (int)kl, k);
				for (int i = 0; i < 5; i++) {
					const char *sv = jraw_get(v, v + vl, st[i], &rl);

					if (sv)
						printf("%s%.*s", lab[i], (int)rl, sv);
				}
			}
		}
		putchar('\n');
	} else if (!strcmp(type, "gap")) {
		printf("-- gap: %" PRId64 " message(s) dropped%s%s\n", jint(m, "dropped"),
		       *jstr(m, "reason") ? ", " : "", jstr(m, "reason"));
	} else {
		s = jdump(m);
		printf("%s\n", s);
		free(s);
	}
	fflush(stdout);
}

static int cmd_tail(void)
{
	static const char *const streams[] = { "raw", "1s", "10s", "1m", "presence",
					       "commands", NULL };
	json_t *filter = json_object(), *sub;
	long long seen = 0;
	struct ws *w;
	int ex = EX_OK, ok = 0, agg;

	for (int s = 0; streams[s]; s++)
		ok |= !strcmp(o.stream, streams[s]);
	if (!ok)
		opts_die("--stream: one of raw, 1s, 10s, 1m, presence, commands");
	agg = strcmp(o.stream, "raw") && strcmp(o.stream, "presence") &&
	      strcmp(o.stream, "commands");
	if (o.since && strcmp(o.stream, "raw"))
		opts_die("--since: only with --stream raw");
	if (o.group_by && !agg)
		opts_die("--group-by: only with --stream 1s, 10s or 1m");

	if (o.devices)
		json_object_set(filter, "devices", o.devices);
	if (o.type)
		json_object_set_new(filter, "device_type", json_string(o.type));
	if (o.labels)
		json_object_set(filter, "labels", o.labels);
	sub = json_pack("{s:s,s:s,s:s,s:o}", "type", "subscribe", "id", "hubctl",
			"stream", o.stream, "filter", filter);
	if (o.since)
		json_object_set_new(sub, "since", json_string(o.since));
	if (o.group_by)
		json_object_set_new(sub, "group_by", json_string(o.group_by));
	w = stream_subscribe(sub, 0, &ex);
	json_decref(sub);
	if (!w)
		return ex;
	if (o.verbose)
		fprintf(stderr, "hubctl: subscribed to %s\n", o.stream);

	while (!o.count || seen < o.count) {
		char *msg;
		size_t len;
		json_t *m;
		const char *type;
		int r = ws_recv(w, &msg, &len, o.deadline);

		if (r == E_INTR)
			break;   /* Ctrl-C: a normal end of tail */
		if (r == E_TIMEOUT) {
			if (o.count || !seen)
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
		if (!m || !json_is_object(m)) {
			json_decref(m);
			free(msg);
			continue;
		}
		type = jstr(m, "type");
		if (!strcmp(type, "error"))
			fprintf(stderr, "hubctl: stream error %s: %s\n", jstr(m, "code"),
				jstr(m, "message"));
		if (o.json)
			print_raw_without_sub(msg, len);
		else
			print_stream_human(m, msg, len);
		if (strcmp(type, "gap") && strcmp(type, "error"))
			seen++;
		json_decref(m);
		free(msg);
	}
	if (ex == EX_WAIT_TIMEOUT && !o.count)
		fprintf(stderr, "hubctl: no messages within the timeout\n");
	else if (ex == EX_WAIT_TIMEOUT)
		fprintf(stderr, "hubctl: %lld of %ld messages before the timeout\n", seen,
			o.count);
	ws_close(w);
	return ex;
}

/* ------------------------------------------------------------------------ */
/* the command line                                                           */

#define OFF(f) offsetof(struct ctl, f)

static int key_file(void *obj, const struct opt *op, const char *val, char *err, size_t errlen)
{
	size_t n;
	char *k = hub_read_file(val, CTL_KEY_MAX, &n);

	if (!k) {
		snprintf(err, errlen, "--key-file %s: %s", val, errno == EFBIG ?
			 "over 4096 bytes" : strerror(errno));
		return -1;
	}
	k[strcspn(k, "\r\n")] = '\0';
	free(o.key);
	o.key = k;
	return 0;
}

/* an integer option of the command's body (op->data: its key) */
static int body_int(void *obj, const struct opt *op, const char *val, char *err, size_t errlen)
{
	json_object_set_new(o.body, op->data, json_integer(o.n));
	return 0;
}

/* an option of the rollout object (op->data: its key) */
static int rollout_num(void *obj, const struct opt *op, const char *val, char *err,
		       size_t errlen)
{
	json_object_set_new(o.ro, op->data, op->type == OPT_DBL ? json_real(o.ratio) :
			    json_integer(o.n));
	return 0;
}

/* k=v into --label's object */
static int add_label(void *obj, const struct opt *op, const char *val, char *err,
		     size_t errlen)
{
	const char *eq = strchr(val, '=');
	char *k;
	int bad;

	if (!eq || eq == val) {
		snprintf(err, errlen, "--label: expected k=v, got '%s'", val);
		return -1;
	}
	if (!o.labels)
		o.labels = json_object();
	k = strndup(val, (size_t)(eq - val));
	bad = !k || json_object_set_new(o.labels, k, json_string(eq + 1));
	free(k);
	if (bad)
		snprintf(err, errlen, "--label: not valid UTF-8: '%s'", val);
	return bad ? -1 : 0;
}

static int add_device(void *obj, const struct opt *op, const char *val, char *err,
		      size_t errlen)
{
	json_t *s = *val ? json_string(val) : NULL;

	if (!s) {
		snprintf(err, errlen, "--device: a device id or prefix*, got '%s'", val);
		return -1;
	}
	if (!o.devices)
		o.devices = json_array();
	json_array_append_new(o.devices, s);
	return 0;
}

/* val must be one of the words of op->data ("true, false") */
static int one_of(void *obj, const struct opt *op, const char *val, char *err, size_t errlen)
{
	const char *w = op->data;
	size_t n = strlen(val);

	for (const char *p = strstr(w, val); n && p; p = strstr(p + 1, val))
		if ((p == w || p[-1] == ' ') && (!p[n] || p[n] == ','))
			return 0;
	snprintf(err, errlen, "--%s: one of %s", op->name, w);
	return -1;
}

static int printable(void *obj, const struct opt *op, const char *val, char *err,
		     size_t errlen)
{
	for (const char *q = val; *q; q++)
		if ((unsigned char)*q < 0x21 || *q == 0x7f) {
			snprintf(err, errlen, "--%s: printable characters without spaces only",
				 op->name);
			return -1;
		}
	return 0;
}


/* ------------------------------------------------------------------------ */
/* verify: the provenance verifier (docs/provenance.md)                       */

enum { VX_INTACT = 0, VX_TAMPERED = 1, VX_ERROR = 2 };

struct ventry {
	json_t *j;                     /* borrowed from the page array kept in vchain */
	struct prov_entry e;
	const char *id;
	int64_t ts;
	bool sig_bad;
};

struct vchain {
	unsigned shard;
	json_t *pages;                 /* the answers, kept for the entries' strings */
	struct ventry *v;
	size_t n, cap;
	char *head;                    /* "<n> <hex>" as Redis holds it, or NULL */
	char *sigkey;
	size_t unchained;              /* entries stored with provenance off */
};

static int vx(int ex)                  /* an HTTP/transport exit -> verify's 2 */
{
	return ex == EX_OK ? EX_OK : VX_ERROR;
}

static const char *js(json_t *o2, const char *k, size_t *len)
{
	json_t *v = json_object_get(o2, k);

	*len = json_is_string(v) ? json_string_length(v) : 0;
	return json_is_string(v) ? json_string_value(v) : "";
}

static int64_t jnum(json_t *o2, const char *k)
{
	size_t l;
	const char *s = js(o2, k, &l);
	int64_t v = 0;

	if (hub_parse_i64(s, l, INT64_MIN / 2, INT64_MAX / 2, &v))
		return json_is_integer(json_object_get(o2, k)) ? json_integer_value(json_object_get(o2, k)) : 0;
	return v;
}

/* Recomputes one entry's own hash from what it stores. -1: malformed. */
static int ventry_load(struct ventry *ve, json_t *j, const char *device, const uint8_t *sigkey)
{
	struct prov_reading r;
	size_t phl, sl;
	const char *ph = js(j, "ph", &phl), *sig;

	memset(ve, 0, sizeof(*ve));
	ve->j = j;
	ve->id = jstr(j, "id");
	r.device = device;
	r.device_len = strlen(device);
	r.ts = js(j, "ts", &r.ts_len);
	r.data = js(j, "data", &r.data_len);
	r.gw = js(j, "gw", &r.gw_len);
	r.seq = jnum(j, "seq");
	r.at = jnum(j, "at");
	r.n = jnum(j, "n");
	sig = js(j, "sig", &sl);
	r.sig = sig;
	r.sig_len = sl;
	ve->ts = jnum(j, "ts");
	ve->e.n = r.n;
	if (hub_unhex(ph, phl, ve->e.ph, PROV_HASH_LEN))
		return -1;
	prov_chain_hash(ve->e.ph, &r, ve->e.h);
	if (sl) {
		uint8_t sg[PROV_SIG_LEN], msg[4096];
		size_t ml = prov_reading_message(device, r.device_len, r.ts, r.ts_len, r.data,
						 r.data_len, msg, sizeof(msg));
		ve->sig_bad = !sigkey || ml > sizeof(msg) || hub_unhex(sig, sl, sg, PROV_SIG_LEN) ||
			      !prov_ed25519_verify(sigkey, msg, ml, sg);
	}
	return 0;
}

static int vchain_fetch(const char *device, unsigned shard, struct vchain *c, unsigned *shards)
{
	char after[64] = "";
	hub_buf p = { 0 };
	uint8_t sk[PROV_KEY_LEN];
	bool have_sk = false;

	c->shard = shard;
	c->pages = json_array();
	for (;;) {
		json_t *doc, *ents;
		int ex;

		p.len = 0;
		hub_buf_puts(&p, "/v1/provenance/chain/");
		urlenc(&p, device);
		hub_buf_printf(&p, "?shard=%u&from=%ld&to=%ld&limit=1000", shard, o.vfrom, o.vto);
		if (after[0])
			hub_buf_printf(&p, "&after=%s", after);
		if ((ex = api("GET", p.data, NULL, NULL, &doc, NULL))) {
			hub_buf_free(&p);
			return vx(ex);
		}
		json_array_append_new(c->pages, doc);
		*shards = (unsigned)jint(doc, "shards");
		if (!c->head && json_is_string(json_object_get(doc, "head")))
			c->head = hub_xstrdup(jstr(doc, "head"));
		if (!c->sigkey && json_is_string(json_object_get(doc, "sigkey"))) {
			c->sigkey = hub_xstrdup(jstr(doc, "sigkey"));
			have_sk = !hub_unhex(c->sigkey, strlen(c->sigkey), sk, PROV_KEY_LEN);
		}
		ents = json_object_get(doc, "entries");
		for (size_t i = 0; i < json_array_size(ents); i++) {
			json_t *j = json_array_get(ents, i);
			if (c->n == c->cap) {
				c->cap = c->cap ? c->cap * 2 : 256;
				c->v = hub_xrealloc(c->v, c->cap * sizeof(*c->v));
			}
			if (ventry_load(&c->v[c->n], j, device, have_sk ? sk : NULL)) {
				c->unchained++; /* no ph: stored with provenance off */
				continue;
			}
			c->n++;
		}
		if (!json_is_string(json_object_get(doc, "next")))
			break;
		snprintf(after, sizeof(after), "%s", jstr(doc, "next"));
	}
	hub_buf_free(&p);
	return EX_OK;
}

static void vchain_free(struct vchain *c)
{
	json_decref(c->pages);
	free(c->v);
	free(c->head);
	free(c->sigkey);
}

static int report(const char *device, struct vchain *c, const char *fault, size_t at,
		  const char *why, size_t total, size_t nck)
{
	struct ventry *ve = at < c->n ? &c->v[at] : NULL;

	if (o.json) {
		json_t *r = json_pack("{s:b,s:s,s:s,s:i,s:I,s:s?,s:I,s:I,s:s,s:I,s:I}", "intact", 0,
				      "device", device, "fault", fault, "shard", (int)c->shard,
				      "position", (json_int_t)at, "id", ve ? ve->id : NULL,
				      "ts", (json_int_t)(ve ? ve->ts : 0), "n",
				      (json_int_t)(ve ? ve->e.n : 0), "detail", why,
				      "readings", (json_int_t)total, "checkpoints", (json_int_t)nck);
		print_json_line(r);
		json_decref(r);
	} else {
		printf("TAMPERED: %s: %s reading at position %zu of shard %u (entry %s, ts %lld, "
		       "n %lld): %s\n", device, fault, at, c->shard, ve ? ve->id : "-",
		       (long long)(ve ? ve->ts : 0), (long long)(ve ? ve->e.n : 0), why);
	}
	return VX_TAMPERED;
}

/* The checkpoint's signature with one of the trusted keys. */
static bool ck_signed(json_t *ck, json_t *trusted)
{
	uint8_t root[PROV_HASH_LEN], sig[PROV_SIG_LEN], key[PROV_KEY_LEN], msg[256];
	size_t l1, l2, l3, ml;
	const char *rs = js(ck, "root", &l1), *ss = js(ck, "sig", &l2), *ks = js(ck, "key", &l3);
	bool known = false;

	for (size_t i = 0; i < json_array_size(trusted); i++)
		if (!strcmp(json_string_value(json_array_get(trusted, i)) ?: "", ks))
			known = true;
	if (!known || hub_unhex(rs, l1, root, PROV_HASH_LEN) ||
	    hub_unhex(ss, l2, sig, PROV_SIG_LEN) || hub_unhex(ks, l3, key, PROV_KEY_LEN))
		return false;
	ml = prov_checkpoint_message(jint(ck, "period"), jint(ck, "from"), jint(ck, "to"),
				     jint(ck, "count"), root, msg, sizeof(msg));
	return prov_ed25519_verify(key, msg, ml, sig);
}

static int cmd_verify(void)
{
	const char *device = o.pos[0];
	struct vchain *ch = NULL;
	unsigned shards = 1;
	size_t total = 0, nck = 0, unchained = 0;
	json_t *kd = NULL, *trusted, *cks = NULL;
	hub_buf p = { 0 };
	int ex = VX_INTACT;

	if (o.npos != 1 || !hub_id_valid(device, strlen(device)))
		opts_die("verify: one DEVICE id, please");
	if (o.vfrom < 0 || o.vto < 0 || o.vto < o.vfrom)
		opts_die("verify: --from and --to (ms since the epoch, from <= to) are required");
	/* the keys checkpoints may be signed with */
	if (o.vkey) {
		trusted = json_array();
		json_array_append_new(trusted, json_string(o.vkey));
	} else {
		if ((ex = api("GET", "/v1/provenance/key", NULL, NULL, &kd, NULL)))
			return vx(ex);
		trusted = json_incref(json_object_get(kd, "keys"));
	}
	for (unsigned k = 0; k < shards; k++) {
		ch = hub_xrealloc(ch, (k + 1) * sizeof(*ch));
		memset(&ch[k], 0, sizeof(ch[k]));
		if ((ex = vchain_fetch(device, k, &ch[k], &shards))) {
			shards = k + 1;
			goto out;
		}
	}
	/* each stream's chain */
	for (unsigned k = 0; k < shards; k++) {
		struct vchain *c = &ch[k];
		struct prov_entry *e = hub_xmalloc((c->n ? c->n : 1) * sizeof(*e));
		size_t at;
		enum prov_fault f;

		for (size_t i = 0; i < c->n; i++)
			e[i] = c->v[i].e;
		f = prov_walk(e, c->n, &at);
		free(e);
		total += c->n;
		unchained += c->unchained;
		if (f != PROV_OK) {
			ex = report(device, c, prov_fault_name(f), at,
				    "the chain of stored hashes breaks here", total, nck);
			goto out;
		}
		for (size_t i = 0; i < c->n; i++)
			if (c->v[i].sig_bad) {
				ex = report(device, c, "bad_signature", i,
					    "the device's signature does not verify with its key",
					    total, nck);
				goto out;
			}
		/* the stored head, when the range reaches it */
		if (c->head && c->n) {
			struct prov_entry *last = &c->v[c->n - 1].e;
			const char *sp = strchr(c->head, ' ');
			int64_t hn = strtoll(c->head, NULL, 10);
			uint8_t hh[PROV_HASH_LEN];
			if (hn == last->n && sp && !hub_unhex(sp + 1, strlen(sp + 1), hh, PROV_HASH_LEN) &&
			    memcmp(hh, last->h, PROV_HASH_LEN)) {
				ex = report(device, c, "altered", c->n - 1,
					    "the last reading does not hash to the stored chain head",
					    total, nck);
				goto out;
			}
		}
	}
	/* the checkpoints: signature, inclusion, and the chain at their heads */
	hub_buf_puts(&p, "/v1/provenance/checkpoints?device=");
	urlenc(&p, device);
	hub_buf_printf(&p, "&from=%ld&to=%ld", o.vfrom, o.vto + 86400000L);
	if ((ex = api("GET", p.data, NULL, NULL, &cks, NULL))) {
		ex = vx(ex);
		goto out;
	}
	json_t *arr = json_object_get(cks, "checkpoints");
	for (size_t i = 0; i < json_array_size(arr); i++) {
		json_t *ck = json_array_get(arr, i), *leaves = json_object_get(ck, "leaves");
		uint8_t root[PROV_HASH_LEN];
		size_t l;
		const char *rs = js(ck, "root", &l);

		if (!json_array_size(leaves))
			continue; /* it does not name this device */
		nck++;
		if (!ck_signed(ck, trusted) || hub_unhex(rs, l, root, PROV_HASH_LEN)) {
			if (o.json) {
				json_t *r = json_pack("{s:b,s:s,s:s,s:I,s:s}", "intact", 0, "device",
						      device, "fault", "checkpoint_signature", "period",
						      (json_int_t)jint(ck, "period"), "id", jstr(ck, "id"));
				print_json_line(r);
				json_decref(r);
			} else {
				printf("TAMPERED: checkpoint %lld (%s): its signature does not verify "
				       "with the hub's key\n", (long long)jint(ck, "period"),
				       jstr(ck, "id"));
			}
			ex = VX_TAMPERED;
			goto out;
		}
		for (size_t j = 0; j < json_array_size(leaves); j++) {
			json_t *lf = json_array_get(leaves, j), *path = json_object_get(lf, "path");
			struct prov_leaf leaf = { (unsigned)jint(lf, "shard"), device, jint(lf, "n") };
			uint8_t lh[PROV_HASH_LEN], (*pp)[PROV_HASH_LEN];
			size_t np = json_array_size(path), hl;
			const char *hs = js(lf, "head", &hl);
			bool ok = !hub_unhex(hs, hl, leaf.head, PROV_HASH_LEN);

			pp = hub_xmalloc((np ? np : 1) * sizeof(*pp));
			for (size_t q = 0; q < np && ok; q++) {
				const char *x = json_string_value(json_array_get(path, q));
				ok = x && !hub_unhex(x, strlen(x), pp[q], PROV_HASH_LEN);
			}
			prov_leaf_hash(&leaf, lh);
			ok = ok && prov_merkle_check(lh, (size_t)jint(lf, "index"), (size_t)jint(ck, "count"),
						     (const uint8_t (*)[PROV_HASH_LEN])pp, np, root);
			free(pp);
			if (!ok) {
				printf("TAMPERED: checkpoint %lld: the device's head is not in its signed "
				       "root\n", (long long)jint(ck, "period"));
				ex = VX_TAMPERED;
				goto out;
			}
			if (leaf.shard >= shards)
				continue;
			struct vchain *c = &ch[leaf.shard];
			for (size_t q = 0; q < c->n; q++)
				if (c->v[q].e.n == leaf.n && memcmp(c->v[q].e.h, leaf.head, PROV_HASH_LEN)) {
					ex = report(device, c, "altered", q,
						    "the stored history differs from a signed checkpoint",
						    total, nck);
					goto out;
				}
		}
	}
	if (o.json) {
		json_t *r = json_pack("{s:b,s:s,s:I,s:I,s:i,s:I}", "intact", 1, "device", device,
				      "readings", (json_int_t)total, "checkpoints", (json_int_t)nck,
				      "shards", (int)shards, "unchained", (json_int_t)unchained);
		print_json_line(r);
		json_decref(r);
	} else {
		printf("intact: %s: %zu readings chained, %zu signed checkpoints checked\n", device,
		       total, nck);
		if (unchained)
			printf("note: %zu readings in the range were stored with provenance off "
			       "(not chained, not checked)\n", unchained);
	}
out:
	for (unsigned k = 0; ch && k < shards; k++)
		vchain_free(&ch[k]);
	free(ch);
	json_decref(trusted);
	json_decref(kd);
	json_decref(cks);
	hub_buf_free(&p);
	return ex;
}

static const struct opt global_opts[] = {
	{ "url", OPT_STR, OFF(url_s), NULL, 0, 0, "hub address: http://HOST:PORT or https://HOST:PORT\n"
	  "(a path is a prefix of every route; default $HUBCTL_URL or " CTL_DEFAULT_URL ")", "URL" },
	{ "key", OPT_STR, OFF(key), NULL, 0, 0, "API key (default $HUBCTL_KEY)", "KEY" },
	{ "key-file", OPT_STR, OPT_NO_FIELD, NULL, 0, 0, "read the API key from the first line of FILE",
	  "FILE", 0, key_file },
	{ "json", OPT_FLAG, OFF(json), NULL, 0, 0, "machine output: one JSON document per line" },
	{ "timeout", OPT_DBL, OFF(timeout), NULL, 0.001, 1e7, "bound on the whole run (default: 10 s "
	  "per request;\nsend --wait and tail wait without limit)", "S" },
	{ "cafile", OPT_STR, OFF(cafile), NULL, 0, 0, "CA to verify an https:// hub", "FILE" },
	{ "insecure", OPT_FLAG, OFF(insecure), NULL, 0, 0, "do not verify the hub's certificate" },
	{ "verbose", OPT_FLAG, OFF(verbose), NULL, 0, 0, "log requests on stderr", NULL, 'v' },
};

#define BODY_INT(name, key, help) \
	{ name, OPT_LONG, OFF(n), NULL, 0, INT64_MAX / 2, help, "S", 0, body_int, key }
#define LIMITS \
	BODY_INT("ack-timeout", "ack_timeout_s", "ack_timeout_s: the device must answer in S s"), \
	BODY_INT("timeout", "timeout_s", "timeout_s: the command must end in S s (after send,\n" \
		 "not the global --timeout)"), \
	BODY_INT("ttl", "ttl_s", "ttl_s: not delivered after S s"), \
	{ "max-attempts", OPT_LONG, OFF(n), NULL, 0, INT64_MAX / 2, "max_attempts", "N", 0, \
	  body_int, "max_attempts" }
#define PARAMS { "params", OPT_STR, OFF(params), NULL, 0, 0, "the command's params", "JSON|@FILE" }
#define LABEL(what) { "label", OPT_STR, OPT_NO_FIELD, NULL, 0, 0, what " (repeatable)", "k=v", 0, \
		      add_label }
#define WAIT(what) { "wait", OPT_FLAG, OFF(wait), NULL, 0, 0, "follow the " what }
#define TYPE(what) { "type", OPT_STR, OFF(type), NULL, 0, 0, what, "T" }
#define LIMIT { "limit", OPT_LONG, OFF(limit), NULL, 1, 1000, "at most N rows", "N" }

static const struct opt send_opts[] = {
	PARAMS, LIMITS,
	{ "idempotency-key", OPT_STR, OFF(idem), NULL, 0, 0, "a repeat returns the first command",
	  "K", 0, printable },
	WAIT("command to a final state"),
};

static const struct opt fleet_opts[] = {
	TYPE("the device type (required)"), LABEL("devices with this label"), PARAMS,
	{ "max-per-minute", OPT_LONG, OFF(n), NULL, 0, INT64_MAX / 2, "release rate", "N", 0,
	  rollout_num, "max_per_minute" },
	{ "abort-failure-ratio", OPT_DBL, OFF(ratio), NULL, -1e9, 1e9,
	  "abort when failures exceed R (0 to 1) of the finished", "R", 0, rollout_num,
	  "abort_failure_ratio" },
	{ "min-finished", OPT_LONG, OFF(n), NULL, 0, INT64_MAX / 2,
	  "finished commands before the ratio applies", "N", 0, rollout_num, "min_finished" },
	LIMITS, WAIT("rollout until completed or aborted"),
};

static const struct opt list_opts[] = {
	{ "status", OPT_STR, OFF(status), NULL, 0, 0, "only commands in state S", "S", 0, one_of,
	  "queued, sent, received, in_progress, succeeded, failed, rejected, timed_out, "
	  "expired, canceled" },
	LIMIT,
};

static const struct opt devices_opts[] = {
	TYPE("only devices of type T"),
	{ "online", OPT_STR, OFF(online), NULL, 0, 0, "only devices online or not", "true|false", 0,
	  one_of, "true, false" },
	LABEL("only devices with this label"), LIMIT,
};

static const struct opt tail_opts[] = {
	{ "stream", OPT_STR, OFF(stream), "raw", 0, 0, "raw, 1s, 10s, 1m, presence or commands", "S" },
	{ "device", OPT_STR, OPT_NO_FIELD, NULL, 0, 0, "an id or a prefix* (repeatable)", "P", 0,
	  add_device },
	TYPE("only devices of type T"), LABEL("only devices with this label"),
	{ "since", OPT_STR, OFF(since), NULL, 0, 0, "replay from this position (raw)", "POS" },
	{ "group-by", OPT_STR, OFF(group_by), NULL, 0, 0, "aggregate per value of LABEL (1s, 10s, 1m)",
	  "LABEL" },
	{ "count", OPT_LONG, OFF(count), NULL, 1, INT64_MAX / 2, "stop after N data messages", "N" },
};

static const struct opt verify_opts[] = {
	{ "from", OPT_LONG, OFF(vfrom), "-1", -1, INT64_MAX / 2, "first arrival time (ms since the epoch)", "MS" },
	{ "to", OPT_LONG, OFF(vto), "-1", -1, INT64_MAX / 2, "last arrival time (ms since the epoch)", "MS" },
	{ "pubkey", OPT_STR, OFF(vkey), NULL, 0, 0, "trust only this checkpoint key (64 hex digits; default:\n"
	  "the keys the hub lists at /v1/provenance/key)", "HEX" },
};

#define N(t) t, sizeof(t) / sizeof(t[0])

static const struct command {
	const char *name, *synopsis;
	const struct opt *opts;
	size_t nopts;
	int maxpos;
	int (*run)(void);
} commands[] = {
	{ "send", "send DEVICE NAME: create a command", N(send_opts), 2, cmd_send },
	{ "send-fleet", "send-fleet --type T NAME: start a fleet rollout", N(fleet_opts), 1,
	  cmd_send_fleet },
	{ "show", "show ID: a command (or a rollout) with its history", NULL, 0, 1, cmd_show },
	{ "show-rollout", "show-rollout ID: a rollout", NULL, 0, 1, cmd_show_rollout },
	{ "cancel", "cancel ID: cancel a command, or a rollout (its unreleased commands)", NULL, 0, 1,
	  cmd_cancel },
	{ "pause", "pause ID: pause a rollout (no more releases)", NULL, 0, 1, cmd_pause },
	{ "resume", "resume ID: resume a paused rollout", NULL, 0, 1, cmd_resume },
	{ "list-commands", "list-commands DEVICE: a device's commands, newest first", N(list_opts),
	  1, cmd_list },
	{ "devices", "devices: the registered devices", N(devices_opts), 0, cmd_devices },
	{ "tail", "tail: print one dashboard stream until Ctrl-C", N(tail_opts), 0, cmd_tail },
	{ "verify", "verify DEVICE --from MS --to MS: check the device's stored history against\n"
	  "its hash chain and the signed checkpoints (exit 0 intact, 1 tampered, 2 error)",
	  N(verify_opts), 1, cmd_verify },
};

static void usage(FILE *f)
{
	fputs("usage: hubctl [global options] COMMAND [options]\n\n"
	      "Global options (also accepted after COMMAND, except --timeout after send\n"
	      "and send-fleet):\n", f);
	opts_usage(N(global_opts), f);
	fputs("\nCommands:\n", f);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		fprintf(f, "\n%s\n", commands[i].synopsis);
		opts_usage(commands[i].opts, commands[i].nopts, f);
	}
	fputs("\nExit: 0 ok/succeeded, 1 command failed/rejected/timed_out/expired/canceled\n"
	      "(--wait; send-fleet --wait: rollout aborted or any command failed/rejected/\n"
	      "timed_out/expired), 2 usage, 3 HTTP 4xx, 4 hub unreachable or 5xx, 5 wait\n"
	      "timed out, 130 interrupted.\n", f);
}

/* before the command: the command stops the parse; after it: its arguments */
static int positional(void *ctx, const char *a, char *err, size_t errlen)
{
	if (!o.cmd)
		return 1;
	if (o.npos < o.maxpos) {
		o.pos[o.npos++] = a;
		return 0;
	}
	snprintf(err, errlen, "%s: unexpected argument '%s'", o.cmd, a);
	return -1;
}

/* --url and the key: checked, then the client context */
static void start(void)
{
	const char *k;
	char err[256];
	size_t n;
	struct hc_ctx_opts xo = { 0 };

	if (strpbrk(o.url_s, "?#"))
		opts_die("--url: no query or fragment, please: '%s'", o.url_s);
	if (hc_url_parse(&o.url, o.url_s, HC_HTTP | HC_WS, err, sizeof(err)))
		opts_die("--url: %s", err);
	/* the path is a prefix: no trailing '/' */
	for (n = strlen(o.url.path); n > 1 && o.url.path[n - 1] == '/'; n--)
		o.url.path[n - 1] = '\0';
	if (o.key && !*o.key)
		opts_die("the API key is empty");
	for (k = o.key; k && *k; k++)
		if ((unsigned char)*k <= ' ' || *k == 0x7f)
			opts_die("the API key contains spaces or control characters");
	if (o.key) {
		hub_buf b = { 0 };

		hub_buf_printf(&b, "Bearer %s", o.key);
		o.auth = b.data;
	}
	xo.tls = o.url.tls;
	xo.ca_file = o.cafile;
	xo.signals = 1;
	lws_set_log_level(o.verbose ? LLL_ERR | LLL_WARN : 0, NULL);
	o.x = hc_ctx_new(&xo, err, sizeof(err));
	if (!o.x) {
		fprintf(stderr, "hubctl: %s\n", err);
		exit(EX_UNREACHABLE);
	}
	if (o.timeout > 0)
		o.deadline = hub_mono_us() + (int64_t)(o.timeout * 1e6);
}

int main(int argc, char **argv)
{
	const struct command *cmd = NULL;
	const char *v;
	int i = 1, ex;

	signal(SIGPIPE, SIG_IGN);
	v = getenv("HUBCTL_URL");
	o.url_s = hub_xstrdup(v && *v ? v : CTL_DEFAULT_URL);
	if ((v = getenv("HUBCTL_KEY")) && *v)
		o.key = hub_xstrdup(v);
	for (int k = 1; k < argc; k++)
		if (!strcmp(argv[k], "-h") || !strcmp(argv[k], "--help")) {
			usage(stdout);
			return EX_OK;
		}

	const struct opts_tab gtab = { N(global_opts), &o };
	const struct opts_cli gcli = { &gtab, 1, positional, NULL, NULL };
	opts_argv_or_exit(&gcli, argc, argv, &i, usage);
	if (i >= argc)
		opts_die("no command given");
	o.cmd = argv[i++];
	if (!strcmp(o.cmd, "help")) {
		usage(stdout);
		return EX_OK;
	}
	for (size_t k = 0; k < sizeof(commands) / sizeof(commands[0]); k++)
		if (!strcmp(o.cmd, commands[k].name))
			cmd = &commands[k];
	if (!cmd)
		opts_die("unknown command '%s'", o.cmd);

	/* the command's own options first: send's --timeout is its timeout_s */
	const struct opts_tab tabs[] = { { cmd->opts, cmd->nopts, &o }, gtab };
	const struct opts_cli cli = { tabs, 2, positional, NULL, NULL };
	o.body = json_object();
	o.ro = json_object();
	o.maxpos = cmd->maxpos;
	if (opts_defaults(cmd->opts, cmd->nopts, &o, o.err, sizeof(o.err)))
		return EX_USAGE;
	opts_argv_or_exit(&cli, argc, argv, &i, usage);
	if (o.params)
		json_object_set_new(o.body, "params", parse_params(o.params));
	start();
	ex = cmd->run();

	fflush(stdout);
	hc_ctx_free(o.x);
	hc_url_free(&o.url);
	json_decref(o.body);
	json_decref(o.ro);
	json_decref(o.labels);
	json_decref(o.devices);
	for (size_t k = 0; k < sizeof(commands) / sizeof(commands[0]); k++)
		opts_free(commands[k].opts, commands[k].nopts, &o);
	opts_free(N(global_opts), &o);
	free(o.auth);
	return ex;
}
