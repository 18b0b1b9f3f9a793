/* Unit tests of the anomaly model (hub/anomaly.h): the x-anomaly keyword,
 * spikes found and not learnt, Gaussian noise not flagged, flat-line, rate,
 * drift, and the state's text form. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <math.h>
#include <cmocka.h>

#include "hub/anomaly.h"

static uint64_t rng = 88172645463325252ull;

static double unit(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return ((double)((rng * 2685821657736338717ull) >> 11) + 0.5) / 9007199254740992.0;
}

static double gauss(void)
{
	return sqrt(-2 * log(unit())) * cos(2 * M_PI * unit());
}

static anom_spec *spec_of(const char *x)
{
	char doc[512], err[192] = "";
	json_t *j;
	anom_spec *s = NULL;

	snprintf(doc, sizeof(doc), "{\"properties\":{\"t\":{\"type\":\"number\",\"x-anomaly\":%s},"
		 "\"h\":{\"type\":\"number\"}}}", x);
	j = json_loads(doc, 0, NULL);
	assert_non_null(j);
	assert_int_equal(anom_spec_parse(j, &s, err, sizeof(err)), 0);
	assert_string_equal(err, "");
	json_decref(j);
	return s;
}

static void parse_error(const char *doc, const char *want)
{
	char err[192] = "";
	json_t *j = json_loads(doc, 0, NULL);
	anom_spec *s = NULL;

	assert_non_null(j);
	assert_int_equal(anom_spec_parse(j, &s, err, sizeof(err)), -1);
	assert_null(s);
	assert_string_equal(err, want);
	json_decref(j);
}

static void test_spec(void **state)
{
	anom_spec *s;
	json_t *j = json_loads("{\"properties\":{\"t\":{\"type\":\"number\"}}}", 0, NULL);
	char err[192];

	(void)state;
	/* no field marked: no spec, nothing to pay */
	assert_int_equal(anom_spec_parse(j, &s, err, sizeof(err)), 0);
	assert_null(s);
	json_decref(j);
	s = spec_of("{\"zscore\":4,\"flatline\":{\"n\":30},\"max_rate\":2.5,"
		    "\"drift\":{\"sigma\":3,\"window\":9}}");
	assert_int_equal(s->n, 1);
	assert_non_null(anom_spec_find(s, "t", 1));
	assert_null(anom_spec_find(s, "h", 1));
	assert_true(s->rules[0].zscore == 4);
	assert_int_equal(s->rules[0].flat_n, 30);
	assert_true(s->rules[0].max_rate == 2.5);
	assert_true(fabs(s->rules[0].drift_alpha - 0.2) < 1e-12);
	assert_true(s->rules[0].alpha == 0.02);
	assert_int_equal(s->rules[0].warmup, 30);
	anom_spec_free(s);

	parse_error("{\"properties\":{\"t\":{\"type\":\"string\",\"x-anomaly\":{\"zscore\":4}}}}",
		    "telemetry.properties.t.x-anomaly: is only for fields of type number or integer");
	parse_error("{\"properties\":{\"t\":{\"type\":\"number\",\"x-anomaly\":{\"zscore\":-1}}}}",
		    "telemetry.properties.t.x-anomaly: zscore must be a number > 0");
	parse_error("{\"properties\":{\"t\":{\"type\":\"number\",\"x-anomaly\":{}}}}",
		    "telemetry.properties.t.x-anomaly: names no rule (zscore, drift, flatline or max_rate)");
	parse_error("{\"properties\":{\"t\":{\"type\":\"number\",\"x-anomaly\":{\"flatline\":{\"n\":1}}}}}",
		    "telemetry.properties.t.x-anomaly: flatline must be {\"n\": an integer from 2 to 1000000}");
	parse_error("{\"properties\":{\"t\":{\"type\":\"number\",\"x-anomaly\":{\"zscore\":4,\"alpha\":1}}}}",
		    "telemetry.properties.t.x-anomaly: alpha must be a number in (0, 1)");
}

/* 20,000 readings of N(20, 0.5): no spike at 5 sigma; 100 spikes of
 * +-6 sigma all found, and none of them moves the model. */
static void test_noise_and_spikes(void **state)
{
	anom_spec *s = spec_of("{\"zscore\":5}");
	struct anom_state st = { 0 };
	int false_pos = 0, found = 0;
	double score;

	(void)state;
	for (int i = 0; i < 20000; i++) {
		bool spike = i > 100 && i % 200 == 0;
		double x = spike ? 20 + (i % 400 ? 3.0 : -3.0) : 20 + 0.5 * gauss();
		enum anom_kind k = anom_observe(&s->rules[0], &st, x, 1000 + i * 1000LL, &score);

		if (spike) {
			struct anom_state before = st;
			(void)before;
			found += k == ANOM_SPIKE;
			if (k == ANOM_SPIKE)
				assert_true(score > 5);
		} else {
			false_pos += k != ANOM_NONE;
		}
	}
	assert_int_equal(false_pos, 0);
	assert_int_equal(found, 99);
	assert_true(fabs(st.mean - 20) < 0.1);
	assert_true(fabs(sqrt(st.var) - 0.5) < 0.1);

	/* A spike leaves the model exactly as it was. */
	struct anom_state before = st;
	assert_int_equal(anom_observe(&s->rules[0], &st, 1000, 99999999, &score), ANOM_SPIKE);
	assert_memory_equal(&before.mean, &st.mean, sizeof(st.mean));
	assert_memory_equal(&before.var, &st.var, sizeof(st.var));
	assert_int_equal(before.n, st.n);
	anom_spec_free(s);
}

static void test_warmup(void **state)
{
	anom_spec *s = spec_of("{\"zscore\":3,\"warmup\":10}");
	struct anom_state st = { 0 };
	double score;

	(void)state;
	for (int i = 0; i < 9; i++)
		assert_int_equal(anom_observe(&s->rules[0], &st, i % 2 ? 1 : -1, i + 1, &score),
				 ANOM_NONE);
	/* still warming up: a wild value is learnt, not flagged */
	assert_int_equal(anom_observe(&s->rules[0], &st, 50, 10, &score), ANOM_NONE);
	assert_int_equal(st.n, 10);
	anom_spec_free(s);
}

static void test_flatline(void **state)
{
	anom_spec *s = spec_of("{\"zscore\":5,\"flatline\":{\"n\":5}}");
	struct anom_state st = { 0 };
	double score = 0;

	(void)state;
	for (int i = 0; i < 50; i++)
		assert_int_equal(anom_observe(&s->rules[0], &st, gauss(), i + 1, &score), ANOM_NONE);
	uint32_t n = st.n;
	for (int i = 0; i < 4; i++)
		assert_int_equal(anom_observe(&s->rules[0], &st, 0.25, 100 + i, &score), ANOM_NONE);
	assert_int_equal(anom_observe(&s->rules[0], &st, 0.25, 200, &score), ANOM_FLATLINE);
	assert_true(score == 5);
	assert_int_equal(anom_observe(&s->rules[0], &st, 0.25, 201, &score), ANOM_FLATLINE);
	assert_int_equal(st.n, n + 4); /* the first n-1 of the run were learnt, no more */
	assert_int_equal(anom_observe(&s->rules[0], &st, 0.5, 202, &score), ANOM_NONE);
	anom_spec_free(s);
}

static void test_rate(void **state)
{
	anom_spec *s = spec_of("{\"max_rate\":2}");
	struct anom_state st = { 0 };
	double score = 0;

	(void)state;
	assert_int_equal(anom_observe(&s->rules[0], &st, 10, 1000, &score), ANOM_NONE);
	assert_int_equal(anom_observe(&s->rules[0], &st, 11, 2000, &score), ANOM_NONE);  /* 1/s */
	assert_int_equal(anom_observe(&s->rules[0], &st, 13, 2500, &score), ANOM_RATE);  /* 4/s */
	assert_true(fabs(score - 4) < 1e-9);
	assert_int_equal(anom_observe(&s->rules[0], &st, 13, 2500, &score), ANOM_NONE);  /* same ts */
	anom_spec_free(s);
}

/* A ramp: flagged as drift (not spike) within a few dozen readings, and the
 * model follows the new level (the flags stop once it settles). */
static void test_drift(void **state)
{
	anom_spec *s = spec_of("{\"zscore\":5,\"drift\":{\"sigma\":3,\"window\":20}}");
	struct anom_state st = { 0 };
	double score;
	int i, first = -1, spikes = 0, drifts = 0, late = 0;

	(void)state;
	for (i = 0; i < 500; i++)
		assert_int_equal(anom_observe(&s->rules[0], &st, gauss(), i, &score), ANOM_NONE);
	for (i = 0; i < 1500; i++) {
		double level = i < 80 ? i * 0.25 : 20;
		enum anom_kind k = anom_observe(&s->rules[0], &st, level + gauss(), 500 + i, &score);
		if (k == ANOM_DRIFT && first < 0)
			first = i;
		drifts += k == ANOM_DRIFT;
		spikes += k == ANOM_SPIKE;
		late += i > 1000 && k != ANOM_NONE;
	}
	printf("drift: first flag after %d readings, %d drift, %d spike flags\n", first, drifts,
	       spikes);
	assert_true(first >= 0 && first < 40);
	assert_true(drifts > 10);
	assert_int_equal(late, 0);
	(void)spikes;
	anom_spec_free(s);
}

static void test_state_text(void **state)
{
	struct anom_state a = { .n = 42, .mean = 20.5, .var = 0.25, .fast = 20.25, .dvar = 0.125,
				.last = 19.5, .last_ts = 1733000000123LL, .flat_val = 19.5,
				.flat_run = 3 }, b;
	char buf[ANOM_STATE_MAX];
	size_t n = anom_state_encode(&a, buf, sizeof(buf));

	(void)state;
	assert_int_equal(n, strlen(buf));
	assert_int_equal(anom_state_decode(buf, n, &b), 0);
	assert_int_equal(b.n, 42);
	assert_true(b.mean == a.mean && b.var == a.var && b.fast == a.fast && b.last == a.last);
	assert_true(b.last_ts == a.last_ts && b.flat_val == a.flat_val && b.flat_run == 3);
	assert_true(b.dvar == a.dvar);
	assert_int_equal(anom_state_decode("2 1 2 3", 7, &b), -1);
	assert_int_equal(anom_state_decode("1 1 nan 0 0 0 0 0 0 0", 21, &b), -1);
	strcpy(buf + n, " x");
	assert_int_equal(anom_state_decode(buf, n + 2, &b), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spec),
		cmocka_unit_test(test_noise_and_spikes),
		cmocka_unit_test(test_warmup),
		cmocka_unit_test(test_flatline),
		cmocka_unit_test(test_rate),
		cmocka_unit_test(test_drift),
		cmocka_unit_test(test_state_text),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
