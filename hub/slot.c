/*
 * slot.c - see slot.h.
 */
#include "hub/slot.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* CRC16/XMODEM, four bits at a time: crc_nibble[i] is the CRC register
 * after shifting i << 12 through four steps of the polynomial. */
static const unsigned short crc_nibble[16] = {
	0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
	0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
};

unsigned hub_crc16(const char *p, size_t len)
{
	unsigned crc = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned b = (unsigned char)p[i];

		crc = ((crc << 4) & 0xffff) ^ crc_nibble[(crc >> 12) ^ (b >> 4)];
		crc = ((crc << 4) & 0xffff) ^ crc_nibble[(crc >> 12) ^ (b & 15)];
	}
	return crc;
}

unsigned hub_slot(const char *key, size_t len)
{
	const char *open = memchr(key, '{', len);

	if (open) {
		size_t rest = len - (size_t)(open - key) - 1;
		const char *close = memchr(open + 1, '}', rest);

		if (close && close > open + 1)
			return hub_crc16(open + 1, (size_t)(close - open - 1)) & (HUB_SLOTS - 1);
	}
	return hub_crc16(key, len) & (HUB_SLOTS - 1);
}

/* ---- which key routes a command ----------------------------------------- */

static bool word_is(const char *a, size_t n, const char *w)
{
	return strlen(w) == n && !strncasecmp(a, w, n);
}

static bool keyless(const char *c, size_t n)
{
	static const char *const names[] = {
		"PING", "INFO", "SCRIPT", "CLUSTER", "CONFIG", "WAIT", "PUBLISH", "AUTH",
		"SELECT", "ECHO", "TIME", "ASKING", "READONLY", "CLIENT", "COMMAND",
		"DBSIZE", "MULTI", "EXEC", "HELLO",
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (word_is(c, n, names[i]))
			return true;
	return false;
}

static bool script_call(const char *c, size_t n)
{
	return word_is(c, n, "EVAL") || word_is(c, n, "EVALSHA") || word_is(c, n, "EVAL_RO") ||
	       word_is(c, n, "EVALSHA_RO") || word_is(c, n, "FCALL") || word_is(c, n, "FCALL_RO");
}

/* The rule of hub_cmd_key over argument i of a command, got through at(). */
typedef bool (*arg_at_fn)(void *ctx, int i, const char **p, size_t *n);

static bool route_key(int argc, arg_at_fn at, void *ctx, const char **key, size_t *klen)
{
	const char *c, *a;
	size_t n, an;

	if (argc < 2 || !at(ctx, 0, &c, &n) || keyless(c, n))
		return false;
	if (script_call(c, n)) {
		char num[12];

		if (argc < 4 || !at(ctx, 2, &a, &an) || !an || an >= sizeof(num))
			return false;
		memcpy(num, a, an);
		num[an] = '\0';
		if (atoi(num) < 1)
			return false;
		return at(ctx, 3, key, klen);
	}
	if (word_is(c, n, "XREAD") || word_is(c, n, "XREADGROUP")) {
		for (int i = 1; i + 1 < argc; i++)
			if (at(ctx, i, &a, &an) && word_is(a, an, "STREAMS"))
				return at(ctx, i + 1, key, klen);
		return false;
	}
	return at(ctx, 1, key, klen);
}

struct argv_ctx {
	const char *const *argv;
	const size_t *argvlen;
};

static bool argv_at(void *ctx, int i, const char **p, size_t *n)
{
	const struct argv_ctx *a = ctx;

	*p = a->argv[i];
	*n = a->argvlen ? a->argvlen[i] : strlen(a->argv[i]);
	return true;
}

bool hub_cmd_key(int argc, const char *const *argv, const size_t *argvlen,
		 const char **key, size_t *klen)
{
	struct argv_ctx a = { argv, argvlen };

	return route_key(argc, argv_at, &a, key, klen);
}

/* RESP: the arguments are read in order; at(i) walks forward from the last
 * one read (route_key asks in increasing order, except for XREAD's scan,
 * which also only goes forward). */
struct resp_ctx {
	const char *p, *end;
	int next;                  /* index of the argument at p */
};

static bool resp_num(const char **pp, const char *end, long *v)
{
	const char *p = *pp;
	long n = 0;

	if (p >= end || *p < '0' || *p > '9')
		return false;
	while (p < end && *p >= '0' && *p <= '9') {
		n = n * 10 + (*p++ - '0');
		if (n > (1L << 40))
			return false;
	}
	if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
		return false;
	*pp = p + 2;
	*v = n;
	return true;
}

static bool resp_at(void *ctx, int i, const char **arg, size_t *n)
{
	struct resp_ctx *r = ctx;

	while (r->next <= i) {
		long len;
		const char *p = r->p;

		if (p >= r->end || *p++ != '$' || !resp_num(&p, r->end, &len) ||
		    r->end - p < len + 2)
			return false;
		*arg = p;
		*n = (size_t)len;
		r->p = p + len + 2;
		r->next++;
	}
	return r->next == i + 1;
}

bool hub_resp_cmd_key(const char *cmd, size_t len, const char **key, size_t *klen)
{
	struct resp_ctx r = { cmd, cmd + len, 0 };
	long argc;

	if (!len || *r.p++ != '*' || !resp_num(&r.p, r.end, &argc) || argc > 1 << 20)
		return false;
	return route_key((int)argc, resp_at, &r, key, klen);
}

int hub_parse_redirect(const char *err, size_t len, int *slot, char *host, size_t hostlen,
		       int *port)
{
	int kind;
	const char *p, *end = err + len, *sp, *colon = NULL;
	long v;

	if (len > 6 && !memcmp(err, "MOVED ", 6)) {
		kind = 1;
		p = err + 6;
	} else if (len > 4 && !memcmp(err, "ASK ", 4)) {
		kind = 2;
		p = err + 4;
	} else {
		return 0;
	}
	for (v = 0; p < end && *p >= '0' && *p <= '9'; p++)
		v = v * 10 + (*p - '0');
	if (p >= end || *p != ' ' || v >= HUB_SLOTS)
		return 0;
	*slot = (int)v;
	sp = ++p;
	for (; p < end; p++)
		if (*p == ':')
			colon = p;
	if (!colon || (size_t)(colon - sp) >= hostlen || colon + 1 >= end)
		return 0;
	for (v = 0, p = colon + 1; p < end && *p >= '0' && *p <= '9'; p++)
		v = v * 10 + (*p - '0');
	if (p != end || v < 1 || v > 65535)
		return 0;
	memcpy(host, sp, (size_t)(colon - sp));
	host[colon - sp] = '\0';
	*port = (int)v;
	return kind;
}

/* ---- slot tags ------------------------------------------------------------ */

/* tag_of[s]: the smallest n whose decimal digits hash to slot s (all below
 * 110000: computed once, about 110,000 CRCs of at most 6 bytes). */
static unsigned *tag_of;

static void tags_build(void)
{
	unsigned left = HUB_SLOTS;
	char d[12];

	tag_of = malloc(HUB_SLOTS * sizeof(*tag_of));
	if (!tag_of)
		abort();
	for (unsigned s = 0; s < HUB_SLOTS; s++)
		tag_of[s] = ~0u;
	for (unsigned n = 0; left; n++) {
		size_t len = 0;
		for (unsigned v = n;; v /= 10) {
			d[len++] = (char)('0' + v % 10);
			if (v < 10)
				break;
		}
		for (size_t i = 0; i < len / 2; i++) {
			char t = d[i];
			d[i] = d[len - 1 - i];
			d[len - 1 - i] = t;
		}
		unsigned s = hub_crc16(d, len) & (HUB_SLOTS - 1);
		if (tag_of[s] == ~0u) {
			tag_of[s] = n;
			left--;
		}
	}
}

size_t hub_slot_tag(unsigned slot, char out[HUB_SLOT_TAG_MAX])
{
	unsigned v;
	size_t len = 0;
	char d[12];

	if (!tag_of)
		tags_build();
	v = tag_of[slot & (HUB_SLOTS - 1)];
	do {
		d[len++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (size_t i = 0; i < len; i++)
		out[i] = d[len - 1 - i];
	out[len] = '\0';
	return len;
}

bool hub_slot_fit_id(char *id, size_t len, unsigned slot)
{
	static const char hex[] = "0123456789abcdef";
	unsigned base, crc;

	if (len < 4)
		return false;
	base = hub_crc16(id, len - 4);
	for (unsigned v = 0; v < 65536; v++) {
		char t[4] = { hex[v >> 12], hex[(v >> 8) & 15], hex[(v >> 4) & 15], hex[v & 15] };
		crc = base;
		for (int i = 0; i < 4; i++) {
			unsigned b = (unsigned char)t[i];
			crc = ((crc << 4) & 0xffff) ^ crc_nibble[(crc >> 12) ^ (b >> 4)];
			crc = ((crc << 4) & 0xffff) ^ crc_nibble[(crc >> 12) ^ (b & 15)];
		}
		if ((crc & (HUB_SLOTS - 1)) == (slot & (HUB_SLOTS - 1))) {
			memcpy(id + len - 4, t, 4);
			return true;
		}
	}
	return false;
}
