/*
 * audit.c - the audit log (see audit.h): XADD to HUB_KEY_AUDIT with
 * MAXLEN ~ audit-max-entries on every entry, XTRIM MINID ~ (now - retention)
 * once a minute, and GET /v1/audit reading it back newest first.
 */
#include "hub/audit.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "hub/http.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"

#define TRIM_US         (60 * LWS_US_PER_SEC)
#define LIST_DEFAULT    100
#define LIST_MAX        1000
#define DETAIL_MAX      4096   /* bytes of detail JSON kept per entry */

struct hub_audit {
	struct hub *hub;
	lws_sorted_usec_list_t sul_trim;
};

static void on_added(redisReply *r, void *arg)
{
	(void)arg;
	if (!r || r->type == REDIS_REPLY_ERROR)
		hub_warn("audit: an entry was not stored (%s)", r ? r->str : "Redis unavailable");
}

void hub_audit(struct hub *hub, const struct hub_req *rq, const char *action,
	       const char *target, const char *detail)
{
	char maxlen[24], at[24];
	const char *who = rq ? hub_req_who(rq)->name : "signal";
	const char *from = rq ? hub_req_peer(rq) : "local";
	size_t dlen = detail ? strlen(detail) : 0;
	const char *argv[18] = { "XADD", HUB_KEY_AUDIT, "MAXLEN", "~", maxlen, "*",
				 "at", at, "who", who, "from", from, "action", action,
				 "target", target ? target : "", "detail", detail ? detail : "{}" };
	size_t lens[18];

	if (!hub->audit)
		return;
	snprintf(maxlen, sizeof(maxlen), "%ld", hub->cfg.audit_max_entries);
	snprintf(at, sizeof(at), "%" PRId64, hub_now_ms());
	for (int i = 0; i < 18; i++)
		lens[i] = strlen(argv[i]);
	if (dlen > DETAIL_MAX) { /* kept whole or not at all: a cut JSON is no JSON */
		argv[17] = "{\"truncated\":true}";
		lens[17] = strlen(argv[17]);
	}
	hub_info("audit: %s %s by %s from %s", action, target ? target : "", who, from);
	if (hub_redis_command_argv(hub->redis, on_added, NULL, 18, argv, lens))
		hub_warn("audit: %s %s by %s: not stored (Redis unavailable)", action,
			 target ? target : "", who);
}

/* ---- retention ------------------------------------------------------------ */

static void trim_cb(lws_sorted_usec_list_t *sul)
{
	struct hub_audit *A = lws_container_of(sul, struct hub_audit, sul_trim);
	struct hub *hub = A->hub;
	char minid[32];
	const char *argv[5] = { "XTRIM", HUB_KEY_AUDIT, "MINID", "~", minid };

	snprintf(minid, sizeof(minid), "%" PRId64,
		 hub_now_ms() - (int64_t)hub->cfg.audit_retention_days * 86400 * 1000);
	if (hub_redis_up(hub->redis))
		hub_redis_command_argv(hub->redis, NULL, NULL, 5, argv, NULL);
	lws_sul_schedule(hub->ctx, 0, &A->sul_trim, trim_cb, TRIM_US);
}

/* ---- GET /v1/audit ----------------------------------------------------------- */

/* A stream id: <ms>-<seq>, digits only. */
static bool stream_id_valid(const char *s)
{
	size_t i = 0, n = strlen(s);

	if (!n || n > 41)
		return false;
	while (i < n && s[i] >= '0' && s[i] <= '9')
		i++;
	if (!i || i == n || s[i] != '-' || i + 1 == n)
		return false;
	for (i++; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

struct list_ctx {
	long limit;
};

static json_t *entry_json(const redisReply *e)
{
	json_t *o = json_object();

	json_object_set_new(o, "id", json_stringn(e->element[0]->str, e->element[0]->len));
	const redisReply *f = e->element[1];
	for (size_t i = 0; f->type == REDIS_REPLY_ARRAY && i + 1 < f->elements; i += 2) {
		const char *k = f->element[i]->str;
		const redisReply *v = f->element[i + 1];
		if (!k || v->type != REDIS_REPLY_STRING)
			continue;
		if (!strcmp(k, "at")) {
			json_object_set_new(o, "at", json_integer(strtoll(v->str, NULL, 10)));
		} else if (!strcmp(k, "detail")) {
			json_t *d = json_loadb(v->str, v->len, 0, NULL);
			json_object_set_new(o, "detail", d ? d : json_object());
		} else if (!strcmp(k, "who") || !strcmp(k, "from") || !strcmp(k, "action") ||
			   !strcmp(k, "target")) {
			json_object_set_new(o, k, json_stringn(v->str, v->len));
		}
	}
	return o;
}

static void on_list(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct list_ctx *c = hub_req_ctx(rq);
	json_t *out, *arr;
	char *body;

	if (hub_req_gone(rq))
		goto done;
	if (!r) {
		hub_req_unavailable(rq);
		goto done;
	}
	if (r->type != REDIS_REPLY_ARRAY) {
		hub_req_error(rq, 500, "internal", NULL, "unexpected answer from Redis");
		goto done;
	}
	out = json_object();
	arr = json_array();
	size_t n = r->elements < (size_t)c->limit ? r->elements : (size_t)c->limit;
	for (size_t i = 0; i < n; i++) {
		const redisReply *e = r->element[i];
		if (e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
		    e->element[0]->type == REDIS_REPLY_STRING)
			json_array_append_new(arr, entry_json(e));
	}
	json_object_set_new(out, "entries", arr);
	/* One more than asked for was read: there is an older page. */
	if (r->elements > (size_t)c->limit && n)
		json_object_set_new(out, "next", json_stringn(r->element[n - 1]->element[0]->str,
							      r->element[n - 1]->element[0]->len));
	else
		json_object_set_new(out, "next", json_null());
	body = json_dumps(out, JSON_COMPACT);
	json_decref(out);
	hub_req_respond(rq, 200, "application/json", body, strlen(body));
	free(body);
done:
	hub_req_unref(rq);
}

static void route_audit(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = hub_req_hub(rq);
	const char *limit = hub_query_get(a->query, "limit"), *before = hub_query_get(a->query, "before");
	struct list_ctx *c;
	char end[48], count[24];
	int64_t v = LIST_DEFAULT;
	const char *argv[6] = { "XREVRANGE", HUB_KEY_AUDIT, end, "-", "COUNT", count };

	if (limit && hub_parse_i64(limit, strlen(limit), 1, LIST_MAX, &v)) {
		hub_req_error(rq, 422, "invalid", "limit", "limit must be an integer in [1, 1000]");
		return;
	}
	if (before && !stream_id_valid(before)) {
		hub_req_error(rq, 422, "invalid", "before",
			      "before must be the `next` of an earlier page (<ms>-<seq>)");
		return;
	}
	snprintf(end, sizeof(end), "%s%s", before ? "(" : "", before ? before : "+");
	snprintf(count, sizeof(count), "%" PRId64, v + 1);
	c = hub_xcalloc(1, sizeof(*c));
	c->limit = (long)v;
	hub_req_set_ctx(rq, c, free);
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub->redis, on_list, rq, 6, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
}

static const struct hub_route routes[] = {
	{ "GET", "/v1/audit", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_audit },
};

/* ---- the module ------------------------------------------------------------ */

static int audit_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_audit *A = hub_xcalloc(1, sizeof(*A));

	(void)err;
	(void)errlen;
	A->hub = hub;
	hub->audit = A;
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), NULL);
	lws_sul_schedule(hub->ctx, 0, &A->sul_trim, trim_cb, TRIM_US);
	return 0;
}

static void audit_stop(struct hub *hub)
{
	if (hub->audit)
		lws_sul_cancel(&hub->audit->sul_trim);
}

static void audit_free(struct hub *hub)
{
	free(hub->audit);
	hub->audit = NULL;
}

const struct hub_module hub_audit_module = {
	.name = "audit",
	.start = audit_start,
	.stop = audit_stop,
	.free = audit_free,
};
