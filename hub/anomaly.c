/*
 * anomaly.c - the online anomaly model of one numeric field (hub/anomaly.h,
 * docs/anomalies.md): parsing the `x-anomaly` keyword, scoring a value,
 * the state's text form. Pure: no lws, no Redis, no clock.
 */
#include "hub/anomaly.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/util.h"

const char *const anom_kind_names[ANOM__COUNT] = {
	[ANOM_NONE] = NULL,
	[ANOM_SPIKE] = "spike",
	[ANOM_DRIFT] = "drift",
	[ANOM_FLATLINE] = "flatline",
	[ANOM_RATE] = "rate",
};

#define DEFAULT_ALPHA        0.02
#define DEFAULT_WARMUP       30
#define DEFAULT_DRIFT_WINDOW 20
#define SD_FLOOR             1e-12

/* ---- the spec ------------------------------------------------------------- */

/* A positive number member, or def when absent. -1 when present and not a
 * number within (lo, hi]. */
static int num_member(const json_t *o, const char *name, double lo, double hi, double def,
		      double *out)
{
	const json_t *v = json_object_get(o, name);

	if (!v) {
		*out = def;
		return 0;
	}
	if (!json_is_number(v))
		return -1;
	*out = json_number_value(v);
	return *out > lo && *out <= hi ? 0 : -1;
}

static int int_member(const json_t *o, const char *name, long long lo, long long hi,
		      long long def, unsigned *out)
{
	const json_t *v = json_object_get(o, name);
	long long x;

	if (!v) {
		*out = (unsigned)def;
		return 0;
	}
	if (!json_is_integer(v))
		return -1;
	x = json_integer_value(v);
	if (x < lo || x > hi)
		return -1;
	*out = (unsigned)x;
	return 0;
}

static int rule_parse(const char *name, const json_t *field, const json_t *x,
		      struct anom_rule *r, char *err, size_t errlen)
{
	const json_t *type = json_object_get(field, "type"), *flat, *drift;
	const char *what = NULL;
	unsigned window = DEFAULT_DRIFT_WINDOW;

	memset(r, 0, sizeof(*r));
	if (!json_is_object(x))
		what = "must be an object";
	else if (!json_is_string(type) || (strcmp(json_string_value(type), "number") &&
					   strcmp(json_string_value(type), "integer")))
		what = "is only for fields of type number or integer";
	else if (num_member(x, "zscore", 0, 1e6, 0, &r->zscore))
		what = "zscore must be a number > 0";
	else if (num_member(x, "alpha", 0, 0.999999, DEFAULT_ALPHA, &r->alpha))
		what = "alpha must be a number in (0, 1)";
	else if (int_member(x, "warmup", 2, 1000000, DEFAULT_WARMUP, &r->warmup))
		what = "warmup must be an integer from 2 to 1000000";
	else if (num_member(x, "max_rate", 0, 1e300, 0, &r->max_rate))
		what = "max_rate must be a number > 0 (units per second)";
	else if (num_member(x, "min_sd", -1e-300, 1e300, 0, &r->min_sd))
		what = "min_sd must be a number >= 0";
	else if ((flat = json_object_get(x, "flatline")) &&
		 (!json_is_object(flat) || !json_object_get(flat, "n") ||
		  int_member(flat, "n", 2, 1000000, 0, &r->flat_n)))
		what = "flatline must be {\"n\": an integer from 2 to 1000000}";
	else if ((drift = json_object_get(x, "drift")) &&
		 (!json_is_object(drift) || !json_object_get(drift, "sigma") ||
		  num_member(drift, "sigma", 0, 1e6, 0, &r->drift_sigma) ||
		  int_member(drift, "window", 2, 1000000, DEFAULT_DRIFT_WINDOW, &window)))
		what = "drift must be {\"sigma\": a number > 0, \"window\": an integer >= 2}";
	else if (!r->zscore && !r->flat_n && !r->max_rate && !r->drift_sigma)
		what = "names no rule (zscore, drift, flatline or max_rate)";
	if (what) {
		snprintf(err, errlen, "telemetry.properties.%.128s.x-anomaly: %s", name, what);
		return -1;
	}
	r->drift_alpha = 2.0 / (window + 1.0);
	r->field_len = strlen(name);
	r->field = hub_xstrdup(name);
	return 0;
}

int anom_spec_parse(const json_t *telemetry, anom_spec **out, char *err, size_t errlen)
{
	const json_t *props = json_object_get(telemetry, "properties"), *field;
	const char *name;
	anom_spec *spec = NULL;

	*out = NULL;
	if (!json_is_object(props))
		return 0;
	json_object_foreach((json_t *)props, name, field) {
		const json_t *x = json_object_get(field, "x-anomaly");

		if (!x)
			continue;
		if (!spec)
			spec = hub_xcalloc(1, sizeof(*spec));
		if (spec->n == ANOM_FIELDS_MAX) {
			snprintf(err, errlen, "telemetry.properties: more than %d fields carry x-anomaly",
				 ANOM_FIELDS_MAX);
			goto fail;
		}
		spec->rules = hub_xrealloc(spec->rules, (spec->n + 1) * sizeof(*spec->rules));
		if (rule_parse(name, field, x, &spec->rules[spec->n], err, errlen))
			goto fail;
		spec->n++;
	}
	*out = spec;
	return 0;
fail:
	anom_spec_free(spec);
	return -1;
}

void anom_spec_free(anom_spec *spec)
{
	if (!spec)
		return;
	for (size_t i = 0; i < spec->n; i++)
		free(spec->rules[i].field);
	free(spec->rules);
	free(spec);
}

const struct anom_rule *anom_spec_find(const anom_spec *spec, const char *name, size_t len)
{
	for (size_t i = 0; spec && i < spec->n; i++)
		if (spec->rules[i].field_len == len && !memcmp(spec->rules[i].field, name, len))
			return &spec->rules[i];
	return NULL;
}

/* ---- the model ------------------------------------------------------------ */

static void learn(const struct anom_rule *r, struct anom_state *s, double x)
{
	double d = x - s->mean;

	if (s->last_ts && s->n) {
		double q = (x - s->last) * (x - s->last) / 2;
		s->dvar += s->n < r->warmup ? (q - s->dvar) / s->n : r->alpha * (q - s->dvar);
	}
	s->n++;
	if (s->n <= r->warmup) {
		/* Welford: the plain mean and variance of the first values */
		s->mean += d / s->n;
		s->var += (d * (x - s->mean) - s->var) / s->n;
		s->fast = s->mean;
		return;
	}
	s->mean += r->alpha * d;
	s->var = (1 - r->alpha) * (s->var + r->alpha * d * d);
}

enum anom_kind anom_observe(const struct anom_rule *r, struct anom_state *s, double x,
			    int64_t ts, double *score)
{
	bool warm = s->n >= r->warmup;
	double sd = sqrt(s->var > 0 ? s->var : 0);

	if (sd < r->min_sd)
		sd = r->min_sd;
	if (sd < SD_FLOOR)
		sd = SD_FLOOR;
	if (s->flat_run && x == s->flat_val) {
		if (s->flat_run < UINT32_MAX)
			s->flat_run++;
	} else {
		s->flat_val = x;
		s->flat_run = 1;
	}
	if (r->flat_n && s->flat_run >= r->flat_n) {
		*score = s->flat_run;
		return ANOM_FLATLINE;
	}
	if (warm)
		s->fast += r->drift_alpha * (x - s->fast);
	double dsd = sqrt(s->dvar > 0 ? s->dvar : 0);
	if (dsd < r->min_sd)
		dsd = r->min_sd;
	if (dsd < SD_FLOOR)
		dsd = SD_FLOOR;
	if (warm && r->drift_sigma && fabs(s->fast - s->mean) / dsd > r->drift_sigma) {
		*score = fabs(s->fast - s->mean) / dsd;
		/* follow the level at the fast pace, keep the width */
		s->mean += r->drift_alpha * (x - s->mean);
		s->last = x;
		s->last_ts = ts;
		return ANOM_DRIFT;
	}
	if (warm && r->zscore && fabs(x - s->mean) / sd > r->zscore) {
		*score = fabs(x - s->mean) / sd;
		return ANOM_SPIKE;                     /* not learnt, not `last` */
	}
	enum anom_kind k = ANOM_NONE;
	if (r->max_rate && s->last_ts && ts > s->last_ts) {
		double rate = fabs(x - s->last) * 1000.0 / (double)(ts - s->last_ts);
		if (rate > r->max_rate) {
			*score = rate;
			k = ANOM_RATE;
		}
	}
	learn(r, s, x);
	s->last = x;
	s->last_ts = ts;
	return k;
}

/* ---- the state's text ----------------------------------------------------- */

size_t anom_state_encode(const struct anom_state *s, char *buf, size_t n)
{
	int len = snprintf(buf, n, "1 %u %.17g %.17g %.17g %.17g %lld %.17g %u %.17g", s->n,
			   s->mean, s->var, s->fast, s->last, (long long)s->last_ts, s->flat_val,
			   s->flat_run, s->dvar);

	return len < 0 ? 0 : (size_t)len < n ? (size_t)len : n ? n - 1 : 0;
}

int anom_state_decode(const char *text, size_t len, struct anom_state *s)
{
	char buf[ANOM_STATE_MAX];
	struct anom_state t = { 0 };
	long long ts;
	int used = 0;

	if (len >= sizeof(buf))
		return -1;
	memcpy(buf, text, len);
	buf[len] = '\0';
	if (sscanf(buf, "1 %u %lf %lf %lf %lf %lld %lf %u %lf%n", &t.n, &t.mean, &t.var, &t.fast,
		   &t.last, &ts, &t.flat_val, &t.flat_run, &t.dvar, &used) != 9 ||
	    (size_t)used != len || !isfinite(t.dvar) || t.dvar < 0 ||
	    !isfinite(t.mean) || !isfinite(t.var) || t.var < 0 || !isfinite(t.fast) ||
	    !isfinite(t.last) || !isfinite(t.flat_val) || ts < 0)
		return -1;
	t.last_ts = ts;
	*s = t;
	return 0;
}
