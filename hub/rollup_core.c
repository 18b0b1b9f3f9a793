#include "hub/rollup_core.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const int64_t ru_gran_ms[RU__COUNT] = { 60000, 3600000, 86400000 };
const char *const ru_gran_names[RU__COUNT] = { "1m", "1h", "1d" };
const int64_t ru_gran_max_range_ms[RU__COUNT] = {
	86400000LL,              /* 1m: 1 day, 1,440 buckets */
	92LL * 86400000,         /* 1h: 92 days, 2,208 buckets */
	3LL * 366 * 86400000,    /* 1d: 3 years, 1,098 buckets */
};

static void fold(struct ru_part *d, const struct ru_part *s)
{
	if (!s->count)
		return;
	if (!d->count) {
		*d = *s;
		return;
	}
	d->count += s->count;
	d->sum += s->sum;
	d->sumsq += s->sumsq;
	if (s->min < d->min)
		d->min = s->min;
	if (s->max > d->max)
		d->max = s->max;
	if (s->first_ts < d->first_ts || (s->first_ts == d->first_ts && s->first < d->first)) {
		d->first_ts = s->first_ts;
		d->first = s->first;
	}
	if (s->last_ts > d->last_ts || (s->last_ts == d->last_ts && s->last > d->last)) {
		d->last_ts = s->last_ts;
		d->last = s->last;
	}
}

void ru_part_add(struct ru_part *p, double v, int64_t ts)
{
	struct ru_part one = { 1, v, v * v, v, v, ts, ts, v, v };

	if (isfinite(v))
		fold(p, &one);
}

void ru_part_merge(struct ru_part *dst, const struct ru_part *src)
{
	fold(dst, src);
}

static void put_double(hub_buf *b, double v)
{
	size_t n;

	hub_buf_reserve(b, 32);
	n = hub_fmt_decimal(b->data + b->len, v);
	b->len += n ? n : (size_t)snprintf(b->data + b->len, 32, "%.17g", v);
}

void ru_part_format(const struct ru_part *p, hub_buf *out)
{
	hub_buf_i64(out, p->count);
	hub_buf_puts(out, " ");
	put_double(out, p->sum);
	hub_buf_puts(out, " ");
	put_double(out, p->sumsq);
	hub_buf_puts(out, " ");
	put_double(out, p->min);
	hub_buf_puts(out, " ");
	put_double(out, p->max);
	hub_buf_puts(out, " ");
	hub_buf_i64(out, p->first_ts);
	hub_buf_puts(out, " ");
	put_double(out, p->first);
	hub_buf_puts(out, " ");
	hub_buf_i64(out, p->last_ts);
	hub_buf_puts(out, " ");
	put_double(out, p->last);
}

int ru_part_parse(const char *s, size_t len, struct ru_part *p)
{
	char tmp[512], *q, *end;
	double d[9];

	if (!len || len >= sizeof(tmp))
		return -1;
	memcpy(tmp, s, len);
	tmp[len] = '\0';
	q = tmp;
	for (int i = 0; i < 9; i++) {
		if (*q == ' ' || !*q)
			return -1;
		d[i] = strtod(q, &end);
		if (end == q || (i < 8 && *end != ' ') || (i == 8 && *end))
			return -1;
		q = *end ? end + 1 : end;
	}
	if (d[0] < 1 || d[0] != floor(d[0]))
		return -1;
	p->count = (int64_t)d[0];
	p->sum = d[1];
	p->sumsq = d[2];
	p->min = d[3];
	p->max = d[4];
	p->first_ts = (int64_t)d[5];
	p->first = d[6];
	p->last_ts = (int64_t)d[7];
	p->last = d[8];
	return 0;
}

double ru_part_mean(const struct ru_part *p)
{
	return p->count ? p->sum / (double)p->count : 0;
}

double ru_part_stddev(const struct ru_part *p)
{
	double m, var;

	if (p->count < 2)
		return 0;
	m = p->sum / (double)p->count;
	var = p->sumsq / (double)p->count - m * m;
	return var > 0 ? sqrt(var) : 0;
}

int ru_gran_parse(const char *s)
{
	for (int g = 0; g < RU__COUNT; g++)
		if (!strcmp(s, ru_gran_names[g]))
			return g;
	return -1;
}

/* ---- tiers ---------------------------------------------------------------- */

static int tier_name_ok(const char *s, size_t n)
{
	if (!n || n > RU_TIER_NAME_MAX)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' ||
		      s[i] == '-'))
			return 0;
	return 1;
}

static int num(const char **p, long long lo, long long hi, long long *out)
{
	char *end;
	long long v;

	if (**p < '0' || **p > '9')
		return -1;
	v = strtoll(*p, &end, 10);
	if (v < lo || v > hi)
		return -1;
	*p = end;
	*out = v;
	return 0;
}

int ru_tiers_parse(const char *spec, struct ru_tiers *out, char *err, size_t errlen)
{
	const char *p = spec;

	memset(out, 0, sizeof(*out));
	while (p && *p) {
		const char *colon = strchr(p, ':');
		long long req, win, range;
		struct ru_tier *t;

		if (out->n == RU_TIERS_MAX) {
			snprintf(err, errlen, "at most %d tiers", RU_TIERS_MAX);
			return -1;
		}
		if (!colon || !tier_name_ok(p, (size_t)(colon - p))) {
			snprintf(err, errlen, "tier %zu: a name of [a-z0-9_-]{1,32} then ':'", out->n + 1);
			return -1;
		}
		t = &out->v[out->n];
		memcpy(t->name, p, (size_t)(colon - p));
		t->name[colon - p] = '\0';
		if (ru_tiers_find(out, t->name)) {
			snprintf(err, errlen, "tier %s named twice", t->name);
			return -1;
		}
		p = colon + 1;
		if (num(&p, 0, 1000000000LL, &req) || *p++ != '/' ||
		    num(&p, 1, 86400, &win) || *p++ != ':' ||
		    num(&p, 1, 100LL * 366 * 86400, &range) || (*p && *p != ',')) {
			snprintf(err, errlen, "tier %s: expected <requests>/<window s>:<max range s>",
				 t->name);
			return -1;
		}
		t->requests = req;
		t->window_ms = win * 1000;
		t->max_range_ms = range * 1000;
		out->n++;
		if (*p == ',' && !*++p) {
			snprintf(err, errlen, "a tier after the last ','");
			return -1;
		}
	}
	if (!out->n) {
		snprintf(err, errlen, "no tier defined");
		return -1;
	}
	return 0;
}

const struct ru_tier *ru_tiers_find(const struct ru_tiers *t, const char *name)
{
	for (size_t i = 0; i < t->n; i++)
		if (!strcmp(t->v[i].name, name))
			return &t->v[i];
	return NULL;
}
