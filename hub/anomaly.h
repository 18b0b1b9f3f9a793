/*
 * anomaly.h - the online anomaly model of one numeric field of one device
 * (docs/anomalies.md): the `x-anomaly` thresholds a device type puts on a
 * field of its telemetry schema, the model's state (an EWMA of the mean and
 * of the variance, a faster EWMA of the mean for drifts, the flat-line run
 * and the last value for the rate rule), the verdict on one value, and the
 * state's text form as kept in Redis. Pure: no lws, no hiredis, no clock;
 * unit tested alone (tests/unit/test_anomaly.c). Not thread-safe, no
 * globals: callable from anywhere.
 */
#ifndef HUB_ANOMALY_H
#define HUB_ANOMALY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#define ANOM_FIELDS_MAX   32      /* marked fields per device type */
#define ANOM_STATE_MAX    256     /* bytes of one field's encoded state, at most */

/* What a reading's field was flagged for. The wire names are
 * anom_kind_names; ANOM_NONE (0) is "not flagged". */
enum anom_kind {
	ANOM_NONE,
	ANOM_SPIKE,       /* |x - mean| / sd > zscore */
	ANOM_DRIFT,       /* the fast mean left the slow one by > drift.sigma sd */
	ANOM_FLATLINE,    /* flatline.n identical values in a row */
	ANOM_RATE,        /* |x - last| / seconds > max_rate */
	ANOM__COUNT
};

/* "spike", "drift", "flatline", "rate"; [ANOM_NONE] is NULL. */
extern const char *const anom_kind_names[ANOM__COUNT];

/* One marked field's thresholds (0 turns a rule off). */
struct anom_rule {
	char *field;              /* owned */
	size_t field_len;
	double zscore;            /* spike threshold in standard deviations */
	double alpha;             /* EWMA weight of the slow model (0, 1) */
	unsigned warmup;          /* readings before spike and drift can fire */
	unsigned flat_n;          /* identical values in a row */
	double max_rate;          /* units per second */
	double drift_sigma;       /* |fast - slow| in sd */
	double drift_alpha;       /* EWMA weight of the fast mean: 2 / (window + 1) */
	double min_sd;            /* floor of the sd (a constant signal has 0) */
};

/* The marked fields of one device type, in the order of its schema. */
typedef struct anom_spec {
	struct anom_rule *rules;
	size_t n;
} anom_spec;

/* Reads the `x-anomaly` members of the properties of a telemetry schema
 * (the device-type document's `telemetry` object). Returns 0 with *out the
 * spec, or NULL when no field is marked (nothing to pay per reading); -1
 * with a message in err (up to 160 bytes) naming the field and what is
 * wrong. The caller frees *out with anom_spec_free. */
int anom_spec_parse(const json_t *telemetry, anom_spec **out, char *err, size_t errlen);

void anom_spec_free(anom_spec *spec);

/* The rule of field name[0..len), or NULL. */
const struct anom_rule *anom_spec_find(const anom_spec *spec, const char *name, size_t len);

/* One field's model. Zero it for a field never seen. */
struct anom_state {
	uint32_t n;               /* values learnt (not flagged as spike / flat-line) */
	double mean, var;         /* slow EWMA (Welford's plain mean and variance in warm-up) */
	double fast;              /* fast EWMA of the mean (drift) */
	double dvar;              /* EWMA of (x - last)^2 / 2: the point-to-point noise,
				   * which a slow drift does not widen (drift's unit) */
	double last;              /* the last value not flagged spike or flat-line */
	int64_t last_ts;          /* its ts, ms; 0: none */
	double flat_val;          /* the value of the current run of identical values */
	uint32_t flat_run;        /* its length */
};

/* The verdict on value x at ts (ms) for rule r, with the model updated:
 * a spike is not learnt (the model is not poisoned), a flat-line run not
 * either (a stuck sensor would shrink the variance to 0), a drift moves
 * only the mean (the model follows a real change of level without
 * widening). At most one kind per value, checked in the order flat-line,
 * drift, spike, rate. *score is the rule's measure (run length, sd,
 * units/s); untouched for ANOM_NONE. */
enum anom_kind anom_observe(const struct anom_rule *r, struct anom_state *s, double x,
			    int64_t ts, double *score);

/* The state as text ("1 n mean var fast last last_ts flat_val flat_run dvar"),
 * NUL-terminated in buf (ANOM_STATE_MAX bytes hold it). Returns its
 * length. */
size_t anom_state_encode(const struct anom_state *s, char *buf, size_t n);

/* Parses what anom_state_encode wrote. Returns 0, or -1 (s untouched)
 * when the text is not such a state (another version, garbage). */
int anom_state_decode(const char *text, size_t len, struct anom_state *s);

#endif
