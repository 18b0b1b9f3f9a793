/*
 * revoke.c - revoked gateway credentials (see revoke.h). Redis holds the
 * truth: HUB_KEY_REVOKED maps "sub:<gateway>" or "jti:<token id>" to a JSON
 * object {kind, value, reason, by, at, expires_at}. Each instance mirrors the
 * field names in memory, rebuilt from Redis whenever the command connection
 * comes up and every RELOAD_US (so a missed message or an expired entry is
 * caught within that), and updated at once by the messages on HUB_CH_REVOKED
 * ("add <field>", "lift <field>"). A jti revocation may carry expires_at (the
 * token's own exp is the natural choice): after it the entry is dropped.
 */
#include "hub/revoke.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "hub/audit.h"
#include "hub/events.h"
#include "hub/http.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/strmap.h"
#include "hub/util.h"

#define RELOAD_US    (10 * LWS_US_PER_SEC)
#define RETRY_US     (50 * 1000)   /* until the first load */
#define FIELD_MAX    72       /* "jti:" + 64 */
#define REASON_MAX   256

struct hub_revocations {
	struct hub *hub;
	hub_strmap fields;          /* "sub:x" / "jti:x" -> (void *)1 */
	bool loaded;                /* read from Redis at least once */
	lws_sorted_usec_list_t sul_reload;
};

static bool has(const struct hub_revocations *R, const char *kind, const char *value)
{
	char f[FIELD_MAX + 8];
	int n = snprintf(f, sizeof(f), "%s:%s", kind, value);

	return n > 0 && (size_t)n < sizeof(f) && hub_strmap_get(&R->fields, f, (size_t)n);
}

bool hub_revocations_loaded(const struct hub *hub)
{
	return hub->revoked && hub->revoked->loaded;
}

bool hub_revoked(const struct hub *hub, const auth_principal *who)
{
	const struct hub_revocations *R = hub->revoked;

	if (!R || !R->fields.count)
		return false;
	return has(R, "sub", who->name) || (who->jti[0] && has(R, "jti", who->jti));
}

/* A field was added: live connections it covers close (gateway module). */
static void announce(struct hub *hub, const char *field)
{
	struct hub_ev_revoked ev = { !strncmp(field, "jti:", 4), field + 4 };

	hub_emit(hub, HUB_EV_REVOKED, &ev);
}

static void apply(struct hub_revocations *R, bool add, const char *field, size_t len)
{
	bool had = hub_strmap_get(&R->fields, field, len) != NULL;
	char f[FIELD_MAX + 1];

	if (len < 5 || len > FIELD_MAX || (strncmp(field, "sub:", 4) && strncmp(field, "jti:", 4)))
		return;
	memcpy(f, field, len);
	f[len] = '\0';
	if (!add) {
		if (had)
			hub_strmap_del(&R->fields, f, len);
		return;
	}
	if (had || R->fields.count >= HUB_REVOKE_MAX)
		return;
	hub_strmap_put(&R->fields, f, len, (void *)1);
	hub_info("revoked: %s", f);
	announce(R->hub, f);
}

/* ---- keeping the mirror ------------------------------------------------------ */

/* expires_at of a stored entry (ms), 0 when it has none. */
static int64_t entry_expiry(const char *json, size_t len)
{
	json_t *o = json_loadb(json, len, 0, NULL);
	json_t *e = o ? json_object_get(o, "expires_at") : NULL;
	int64_t v = json_is_integer(e) ? (int64_t)json_integer_value(e) : 0;

	json_decref(o);
	return v;
}

static void on_loaded(redisReply *r, void *arg)
{
	struct hub_revocations *R = arg;
	hub_strmap keep = { 0 };
	int64_t now = hub_now_ms();

	if (!r || r->type != REDIS_REPLY_ARRAY)
		return; /* kept as it is: the next reload tries again */
	for (size_t i = 0; i + 1 < r->elements; i += 2) {
		const redisReply *f = r->element[i], *v = r->element[i + 1];
		int64_t exp;

		if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
			continue;
		exp = entry_expiry(v->str, v->len);
		if (exp && exp <= now) {
			const char *argv[3] = { "HDEL", HUB_KEY_REVOKED, f->str };
			hub_redis_command_argv(R->hub->redis, NULL, NULL, 3, argv, NULL);
			continue;
		}
		hub_strmap_put(&keep, f->str, f->len, (void *)1);
		apply(R, true, f->str, f->len);
	}
	/* What Redis has now, lifts this instance did not hear of included. */
	hub_strmap_free(&R->fields);
	R->fields = keep;
	R->loaded = true;
}

static void reload(struct hub_revocations *R)
{
	const char *argv[2] = { "HGETALL", HUB_KEY_REVOKED };

	hub_redis_command_argv(R->hub->redis, on_loaded, R, 2, argv, NULL);
}

static void reload_cb(lws_sorted_usec_list_t *sul)
{
	struct hub_revocations *R = lws_container_of(sul, struct hub_revocations, sul_reload);

	if (hub_redis_up(R->hub->redis))
		reload(R);
	lws_sul_schedule(R->hub->ctx, 0, &R->sul_reload, reload_cb,
			 R->loaded ? RELOAD_US : RETRY_US);
}

/* The connection is (again) up: read the list at once (emitted while the
 * bus still checks the connection, so from a timer, not from here). */
static void on_redis_ready(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct hub_revocations *R = ctx;

	(void)ev;
	(void)payload;
	lws_sul_schedule(hub->ctx, 0, &R->sul_reload, reload_cb, 1);
}

static void on_message(const char *channel, const char *payload, size_t len, void *arg)
{
	(void)channel;
	if (len > 4 && !strncmp(payload, "add ", 4))
		apply(arg, true, payload + 4, len - 4);
	else if (len > 5 && !strncmp(payload, "lift ", 5))
		apply(arg, false, payload + 5, len - 5);
}

/* ---- the routes ---------------------------------------------------------------- */

/* A token id: 1..64 printable ASCII bytes without spaces. */
static bool jti_valid(const char *s, size_t n)
{
	if (!n || n > 64)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] <= ' ' || s[i] > '~')
			return false;
	return true;
}

/* What a POST or DELETE carries to its Redis reply. */
struct change {
	char field[FIELD_MAX + 1];
	char *entry;               /* the stored JSON (POST) */
};

static void change_free(void *p)
{
	struct change *c = p;

	free(c->entry);
	free(c);
}

static void publish(struct hub *hub, const char *verb, const char *field)
{
	char msg[FIELD_MAX + 8];
	int n = snprintf(msg, sizeof(msg), "%s %s", verb, field);

	hub_redis_publish(hub->redis, HUB_CH_REVOKED, msg, (size_t)n);
}

static void on_added(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct change *c = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);

	if (!r || r->type == REDIS_REPLY_ERROR) {
		if (!hub_req_gone(rq))
			hub_req_unavailable(rq);
		goto done;
	}
	publish(hub, "add", c->field);
	if (hub->revoked)
		apply(hub->revoked, true, c->field, strlen(c->field));
	hub_audit(hub, rq, "revocation.add", c->field, c->entry);
	if (!hub_req_gone(rq))
		hub_req_respond(rq, 201, "application/json", c->entry, strlen(c->entry));
done:
	hub_req_unref(rq);
}

static void route_add(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = hub_req_hub(rq);
	json_error_t jerr;
	json_t *body = json_loadb(a->body, a->body_len, JSON_REJECT_DUPLICATES, &jerr), *e;
	json_t *sub, *jti, *reason, *exp;
	struct change *c;
	const char *kind, *value;
	size_t vlen;

	if (!json_is_object(body)) {
		json_decref(body);
		hub_req_error(rq, 400, "bad_json", NULL, "the body must be a JSON object");
		return;
	}
	sub = json_object_get(body, "sub");
	jti = json_object_get(body, "jti");
	reason = json_object_get(body, "reason");
	exp = json_object_get(body, "expires_at");
	if (!!sub == !!jti) {
		hub_req_error(rq, 422, "invalid", "sub", "give exactly one of sub and jti");
		goto out;
	}
	kind = sub ? "sub" : "jti";
	value = json_string_value(sub ? sub : jti);
	vlen = value ? json_string_length(sub ? sub : jti) : 0;
	if (!value || (sub ? !hub_id_valid(value, vlen) : !jti_valid(value, vlen))) {
		hub_req_error(rq, 422, "invalid", kind, sub ?
			      "sub must be a gateway id ([A-Za-z0-9._:-], 1 to 128 bytes)" :
			      "jti must be 1 to 64 printable bytes without spaces");
		goto out;
	}
	if (reason && (!json_is_string(reason) || json_string_length(reason) > REASON_MAX)) {
		hub_req_error(rq, 422, "invalid", "reason", "reason must be a string of at most 256 bytes");
		goto out;
	}
	if (exp && (!json_is_integer(exp) || json_integer_value(exp) <= hub_now_ms())) {
		hub_req_error(rq, 422, "invalid", "expires_at",
			      "expires_at must be a future time in ms since the epoch");
		goto out;
	}
	if (hub->revoked && hub->revoked->fields.count >= HUB_REVOKE_MAX) {
		hub_req_error(rq, 409, "too_many", NULL,
			      "10,000 revocations are kept at most: lift some, or rotate the key");
		goto out;
	}
	c = hub_xcalloc(1, sizeof(*c));
	snprintf(c->field, sizeof(c->field), "%s:%s", kind, value);
	e = json_pack("{s:s, s:s, s:s, s:s, s:I}", "kind", kind, "value", value,
		      "reason", reason ? json_string_value(reason) : "",
		      "by", hub_req_who(rq)->name, "at", (json_int_t)hub_now_ms());
	if (exp)
		json_object_set(e, "expires_at", exp);
	c->entry = json_dumps(e, JSON_COMPACT);
	json_decref(e);
	hub_req_set_ctx(rq, c, change_free);
	{
		const char *argv[4] = { "HSET", HUB_KEY_REVOKED, c->field, c->entry };
		hub_req_ref(rq);
		if (hub_redis_command_argv(hub->redis, on_added, rq, 4, argv, NULL)) {
			hub_req_unref(rq);
			hub_req_unavailable(rq);
		}
	}
out:
	json_decref(body);
}

static void on_list(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	json_t *out, *arr;
	char *s;

	if (hub_req_gone(rq))
		goto done;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		hub_req_unavailable(rq);
		goto done;
	}
	arr = json_array();
	for (size_t i = 0; i + 1 < r->elements; i += 2) {
		const redisReply *v = r->element[i + 1];
		json_t *o = v->type == REDIS_REPLY_STRING ? json_loadb(v->str, v->len, 0, NULL) : NULL;
		if (json_is_object(o))
			json_array_append_new(arr, o);
		else
			json_decref(o);
	}
	out = json_pack("{s:o}", "revocations", arr);
	s = json_dumps(out, JSON_COMPACT);
	json_decref(out);
	hub_req_respond(rq, 200, "application/json", s, strlen(s));
	free(s);
done:
	hub_req_unref(rq);
}

static void route_list(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *argv[2] = { "HGETALL", HUB_KEY_REVOKED };

	(void)a;
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub_req_hub(rq)->redis, on_list, rq, 2, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
}

static void on_lifted(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct change *c = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);

	if (!r || r->type != REDIS_REPLY_INTEGER) {
		if (!hub_req_gone(rq))
			hub_req_unavailable(rq);
	} else if (!r->integer) {
		if (!hub_req_gone(rq))
			hub_req_error(rq, 404, "not_found", NULL, "no such revocation");
	} else {
		publish(hub, "lift", c->field);
		if (hub->revoked)
			apply(hub->revoked, false, c->field, strlen(c->field));
		hub_audit(hub, rq, "revocation.lift", c->field, NULL);
		if (!hub_req_gone(rq))
			hub_req_respond(rq, 204, "application/json", "", 0);
	}
	hub_req_unref(rq);
}

static void lift(struct hub_req *rq, const char *kind, const char *value)
{
	struct change *c;
	size_t n = strlen(value);

	if (!strcmp(kind, "sub") ? !hub_id_valid(value, n) : !jti_valid(value, n)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such revocation");
		return;
	}
	c = hub_xcalloc(1, sizeof(*c));
	snprintf(c->field, sizeof(c->field), "%s:%s", kind, value);
	hub_req_set_ctx(rq, c, change_free);
	const char *argv[3] = { "HDEL", HUB_KEY_REVOKED, c->field };
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub_req_hub(rq)->redis, on_lifted, rq, 3, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
}

static void route_lift_sub(struct hub_req *rq, const struct hub_route_args *a)
{
	lift(rq, "sub", a->param[0]);
}

static void route_lift_jti(struct hub_req *rq, const struct hub_route_args *a)
{
	lift(rq, "jti", a->param[0]);
}

static const struct hub_route routes[] = {
	{ "POST", "/v1/revocations", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_add },
	{ "GET", "/v1/revocations", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_list },
	{ "DELETE", "/v1/revocations/sub/{}", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_lift_sub },
	{ "DELETE", "/v1/revocations/jti/{}", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_lift_jti },
};

/* ---- the module -------------------------------------------------------------- */

static int revoke_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_revocations *R = hub_xcalloc(1, sizeof(*R));

	(void)err;
	(void)errlen;
	R->hub = hub;
	hub->revoked = R;
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), NULL);
	hub_redis_subscribe(hub->redis, HUB_CH_REVOKED, on_message, R);
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, R);
	lws_sul_schedule(hub->ctx, 0, &R->sul_reload, reload_cb, RETRY_US);
	return 0;
}

static void revoke_stop(struct hub *hub)
{
	if (hub->revoked)
		lws_sul_cancel(&hub->revoked->sul_reload);
}

static void revoke_free(struct hub *hub)
{
	if (!hub->revoked)
		return;
	hub_strmap_free(&hub->revoked->fields);
	free(hub->revoked);
	hub->revoked = NULL;
}

const struct hub_module hub_revoke_module = {
	.name = "revocations",
	.start = revoke_start,
	.stop = revoke_stop,
	.free = revoke_free,
};
