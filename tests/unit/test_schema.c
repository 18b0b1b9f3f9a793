/*
 * test_schema.c - unit tests of the schema validator (protocols/schema.c).
 *
 * Uses deploy/device-types under $HUB_SOURCE_DIR (the repo root; ctest sets
 * it) and builds other schemas inline with schema_set_from_json().
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "protocols/schema.h"

#define MAX_ERRS 80

/* ---------------------------------------------------------------- helpers */

static const char *source_dir(void)
{
	const char *d = getenv("HUB_SOURCE_DIR");

	return d && *d ? d : ".";
}

static schema_set *load_deploy(void)
{
	char dir[1024], err[256] = "";
	schema_set *set;

	snprintf(dir, sizeof(dir), "%s/deploy/device-types", source_dir());
	set = schema_set_load_dir(dir, err, sizeof(err));
	if (!set)
		fail_msg("loading %s: %s", dir, err);
	return set;
}

static json_t *parse(const char *text)
{
	json_error_t jerr;
	json_t *j = json_loads(text, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES |
			       JSON_ALLOW_NUL, &jerr);

	if (!j)
		fail_msg("bad test JSON (%s): %s", jerr.text, text);
	return j;
}

/* A set of one type "t" whose telemetry schema is `schema` (JSON text). */
static schema_set *one_type(const char *schema)
{
	char err[256] = "";
	json_t *docs = json_pack("[{s:s, s:o}]", "device_type", "t",
				 "telemetry", parse(schema));
	schema_set *set;

	assert_non_null(docs);
	set = schema_set_from_json(docs, err, sizeof(err));
	json_decref(docs);
	if (!set)
		fail_msg("schema %s: %s", schema, err);
	return set;
}

static const schema_node *telemetry_of(const schema_set *set, const char *type)
{
	const schema_type *t = schema_set_find(set, type, strlen(type));

	assert_non_null(t);
	return schema_type_telemetry(t);
}

/* Validates `text` against `node` with prefix "data". */
static int check(const schema_node *node, const char *text, schema_error *errs)
{
	json_t *v = parse(text);
	int n;

	memset(errs, 0, sizeof(*errs) * MAX_ERRS);
	n = schema_validate(node, v, "data", errs, MAX_ERRS);
	json_decref(v);
	return n;
}

static void assert_error(const schema_error *e, const char *path,
			 const char *code, const char *message)
{
	assert_string_equal(e->path, path);
	assert_non_null(e->code);
	assert_string_equal(e->code, code);
	assert_string_equal(e->message, message);
}

/* Expects exactly one error with these fields. */
static void expect_one(const schema_node *node, const char *text,
		       const char *path, const char *code, const char *message)
{
	schema_error errs[MAX_ERRS];

	assert_int_equal(check(node, text, errs), 1);
	assert_error(&errs[0], path, code, message);
}

static void expect_valid(const schema_node *node, const char *text)
{
	schema_error errs[MAX_ERRS];
	int n = check(node, text, errs);

	if (n != 0)
		fail_msg("%s: %d errors, first %s %s %s", text, n, errs[0].path,
			 errs[0].code, errs[0].message);
}

/* Expects schema_set_from_json of one document to fail with `expected`. */
static void expect_load_error(const char *doc, const char *expected)
{
	char err[256] = "";
	json_t *docs = json_pack("[o]", parse(doc));
	schema_set *set = schema_set_from_json(docs, err, sizeof(err));

	json_decref(docs);
	schema_set_free(set);
	assert_null(set);
	assert_string_equal(err, expected);
}

static void expect_schema_error(const char *schema, const char *expected)
{
	char err[256] = "";
	json_t *docs = json_pack("[{s:s, s:o}]", "device_type", "t",
				 "telemetry", parse(schema));
	schema_set *set = schema_set_from_json(docs, err, sizeof(err));

	json_decref(docs);
	schema_set_free(set);
	assert_null(set);
	assert_string_equal(err, expected);
}

/* A temporary directory of schema files. */
struct tmpdir {
	char path[64];
};

static void tmp_make(struct tmpdir *d)
{
	snprintf(d->path, sizeof(d->path), "/tmp/test_schema.XXXXXX");
	assert_non_null(mkdtemp(d->path));
}

static void tmp_write(struct tmpdir *d, const char *name, const char *text,
		      size_t len)
{
	char p[256];
	FILE *f;

	snprintf(p, sizeof(p), "%s/%s", d->path, name);
	f = fopen(p, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
}

static void tmp_put(struct tmpdir *d, const char *name, const char *text)
{
	tmp_write(d, name, text, strlen(text));
}

static void tmp_remove(struct tmpdir *d)
{
	DIR *dir = opendir(d->path);
	struct dirent *de;
	char p[512];

	assert_non_null(dir);
	while ((de = readdir(dir))) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		snprintf(p, sizeof(p), "%s/%s", d->path, de->d_name);
		if (unlink(p) != 0)
			rmdir(p);
	}
	closedir(dir);
	assert_int_equal(rmdir(d->path), 0);
}

static const char thermo_like[] =
	"{\"device_type\":\"thermostat\",\"telemetry\":{\"type\":\"object\"}}";

/* ------------------------------------------------------- deploy examples */

static int group_setup(void **state)
{
	*state = load_deploy();
	return 0;
}

static int group_teardown(void **state)
{
	schema_set_free(*state);
	return 0;
}

static void test_load_deploy(void **state)
{
	const schema_set *set = *state;
	const schema_type *t;
	const json_t *doc;

	assert_int_equal(schema_set_count(set), 3);
	/* Load order is the sorted file names. */
	assert_string_equal(schema_type_name(schema_set_at(set, 0)), "door-sensor");
	assert_string_equal(schema_type_name(schema_set_at(set, 1)), "power-meter");
	assert_string_equal(schema_type_name(schema_set_at(set, 2)), "thermostat");
	assert_null(schema_set_at(set, 3));

	/* Names are (pointer, length), not NUL-terminated. */
	t = schema_set_find(set, "thermostat-xyz", 10);
	assert_non_null(t);
	assert_string_equal(schema_type_name(t), "thermostat");
	assert_null(schema_set_find(set, "thermostat", 9));
	assert_null(schema_set_find(set, "fridge", 6));
	assert_null(schema_set_find(set, "", 0));

	doc = schema_type_json(t);
	assert_non_null(doc);
	assert_string_equal(json_string_value(json_object_get(doc, "device_type")),
			    "thermostat");
	assert_non_null(schema_type_telemetry(t));
}

static void test_thermostat_valid(void **state)
{
	const schema_node *n = telemetry_of(*state, "thermostat");

	expect_valid(n, "{\"temperature\":21.5}");
	expect_valid(n, "{\"temperature\":21.5,\"humidity\":40}");
	expect_valid(n, "{\"temperature\":-40}");
	expect_valid(n, "{\"temperature\":125}");
	expect_valid(n, "{\"temperature\":125.0,\"humidity\":0}");
	expect_valid(n, "{\"humidity\":100, \"temperature\":0}");
}

static void test_thermostat_bounds(void **state)
{
	const schema_node *n = telemetry_of(*state, "thermostat");

	expect_one(n, "{\"temperature\":126}", "data.temperature", "maximum",
		   "must be <= 125");
	expect_one(n, "{\"temperature\":125.00001}", "data.temperature",
		   "maximum", "must be <= 125");
	expect_one(n, "{\"temperature\":-40.5}", "data.temperature", "minimum",
		   "must be >= -40");
	expect_one(n, "{\"temperature\":20,\"humidity\":-0.1}", "data.humidity",
		   "minimum", "must be >= 0");
	expect_one(n, "{\"temperature\":20,\"humidity\":101}", "data.humidity",
		   "maximum", "must be <= 100");
}

static void test_thermostat_type_required_additional(void **state)
{
	const schema_node *n = telemetry_of(*state, "thermostat");
	schema_error errs[MAX_ERRS];

	expect_one(n, "{\"temperature\":\"hot\"}", "data.temperature", "type",
		   "must be a number");
	expect_one(n, "{\"temperature\":null}", "data.temperature", "type",
		   "must be a number");
	expect_one(n, "[21.5]", "data", "type", "must be an object");
	expect_one(n, "21.5", "data", "type", "must be an object");
	expect_one(n, "{}", "data.temperature", "required", "is required");
	expect_one(n, "{\"humidity\":3}", "data.temperature", "required",
		   "is required");
	expect_one(n, "{\"temperature\":20,\"pressure\":1013}", "data.pressure",
		   "additionalProperties", "is not allowed");

	/* Several at once, in document order, then missing required. */
	assert_int_equal(check(n, "{\"x\":1,\"humidity\":\"wet\"}", errs), 3);
	assert_error(&errs[0], "data.x", "additionalProperties",
		     "is not allowed");
	assert_error(&errs[1], "data.humidity", "type", "must be a number");
	assert_error(&errs[2], "data.temperature", "required", "is required");
}

static void test_commands(void **state)
{
	const schema_set *set = *state;
	const char *types[] = { "thermostat", "power-meter", "door-sensor" };

	for (size_t i = 0; i < 3; i++) {
		const schema_type *t = schema_set_find(set, types[i],
						       strlen(types[i]));

		assert_non_null(t);
		assert_non_null(schema_type_command(t, "reboot"));
		assert_non_null(schema_type_command(t, "config"));
		assert_non_null(schema_type_command(t, "firmware_update"));
		assert_null(schema_type_command(t, "unknown"));
		assert_null(schema_type_command(t, ""));
		assert_null(schema_type_command(t, "Reboot"));
		assert_null(schema_type_command(t, NULL));
	}
	assert_non_null(schema_type_command(schema_set_find(set, "power-meter", 11),
					    "reset_energy"));
	assert_null(schema_type_command(schema_set_find(set, "thermostat", 10),
					"reset_energy"));
	assert_null(schema_type_command(NULL, "reboot"));
}

static void test_integer_vs_number(void **state)
{
	const schema_type *t = schema_set_find(*state, "thermostat", 10);
	const schema_node *reboot = schema_type_command(t, "reboot");
	const schema_node *config = schema_type_command(t, "config");
	schema_error errs[MAX_ERRS];

	expect_valid(reboot, "{\"delay_s\":5}");
	expect_valid(reboot, "{}");
	expect_one(reboot, "{\"delay_s\":5.0}", "data.delay_s", "type",
		   "must be an integer");
	expect_one(reboot, "{\"delay_s\":5.5}", "data.delay_s", "type",
		   "must be an integer");
	expect_one(reboot, "{\"delay_s\":\"5\"}", "data.delay_s", "type",
		   "must be an integer");
	expect_one(reboot, "{\"delay_s\":3601}", "data.delay_s", "maximum",
		   "must be <= 3600");
	/* No additionalProperties: extra keys are fine. */
	expect_valid(reboot, "{\"delay_s\":0,\"force\":true}");

	/* number accepts integers and reals. */
	expect_valid(config, "{\"setpoint\":20}");
	expect_valid(config, "{\"setpoint\":20.25}");
	expect_one(config, "{\"setpoint\":true}", "data.setpoint", "type",
		   "must be a number");

	/* Prefix is the caller's. */
	{
		json_t *v = parse("{\"setpoint\":40}");

		assert_int_equal(schema_validate(config, v, "params", errs, 4), 1);
		assert_error(&errs[0], "params.setpoint", "maximum",
			     "must be <= 35");
		assert_int_equal(schema_validate(config, v, "", errs, 4), 1);
		assert_error(&errs[0], "setpoint", "maximum", "must be <= 35");
		assert_int_equal(schema_validate(config, v, NULL, errs, 4), 1);
		assert_string_equal(errs[0].path, "setpoint");
		json_decref(v);
	}
}

static void test_firmware_update(void **state)
{
	const schema_type *t = schema_set_find(*state, "thermostat", 10);
	const schema_node *fw = schema_type_command(t, "firmware_update");
	schema_error errs[MAX_ERRS];
	char doc[512];
	const char *sha = "0123456789abcdef0123456789abcdef"
			  "0123456789abcdef0123456789abcdef";

	snprintf(doc, sizeof(doc), "{\"url\":\"https://fw.example/2.4.1.bin\","
		 "\"version\":\"2.4.1\",\"sha256\":\"%s\",\"size_bytes\":1}", sha);
	expect_valid(fw, doc);

	snprintf(doc, sizeof(doc), "{\"url\":\"http://fw.example/x\","
		 "\"version\":\"2.4.1\",\"sha256\":\"%s\"}", sha);
	expect_one(fw, doc, "data.url", "pattern", "must match pattern ^https://");

	snprintf(doc, sizeof(doc), "{\"url\":\"https://x\",\"version\":\"1\","
		 "\"sha256\":\"%.63s\"}", sha);
	expect_one(fw, doc, "data.sha256", "pattern",
		   "must match pattern ^[0-9a-f]{64}$");
	snprintf(doc, sizeof(doc), "{\"url\":\"https://x\",\"version\":\"1\","
		 "\"sha256\":\"%sa\"}", sha);
	expect_one(fw, doc, "data.sha256", "pattern",
		   "must match pattern ^[0-9a-f]{64}$");

	/* An embedded NUL does not hide the rest of the string from $. */
	snprintf(doc, sizeof(doc), "{\"url\":\"https://x\",\"version\":\"1\","
		 "\"sha256\":\"%s\\u0000zz\"}", sha);
	expect_one(fw, doc, "data.sha256", "pattern",
		   "must match pattern ^[0-9a-f]{64}$");

	snprintf(doc, sizeof(doc), "{\"url\":\"https://x\",\"version\":\"%065d\","
		 "\"sha256\":\"%s\"}", 0, sha);
	expect_one(fw, doc, "data.version", "maxLength",
		   "must be at most 64 characters");

	snprintf(doc, sizeof(doc), "{\"url\":\"https://x\",\"version\":\"1\","
		 "\"sha256\":\"%s\",\"size_bytes\":0}", sha);
	expect_one(fw, doc, "data.size_bytes", "minimum", "must be >= 1");

	assert_int_equal(check(fw, "{}", errs), 3);
	assert_error(&errs[0], "data.url", "required", "is required");
	assert_error(&errs[1], "data.version", "required", "is required");
	assert_error(&errs[2], "data.sha256", "required", "is required");
}

static void test_power_meter_and_door_sensor(void **state)
{
	const schema_node *pm = telemetry_of(*state, "power-meter");
	const schema_node *ds = telemetry_of(*state, "door-sensor");
	const schema_node *reset = schema_type_command(
		schema_set_find(*state, "power-meter", 11), "reset_energy");
	schema_error errs[MAX_ERRS];

	expect_valid(pm, "{\"voltage_v\":230.1,\"current_a\":4.2,\"power_w\":966,"
		     "\"energy_wh\":123456,\"phase\":\"L2\",\"relay_closed\":true,"
		     "\"harmonics_pct\":[1.5,0.3],\"alarms\":[\"tamper\"]}");
	expect_one(pm, "{\"voltage_v\":230,\"current_a\":4,\"power_w\":9,"
		   "\"energy_wh\":1.5}", "data.energy_wh", "type",
		   "must be an integer");
	expect_one(pm, "{\"voltage_v\":230,\"current_a\":4,\"power_w\":9,"
		   "\"energy_wh\":1,\"phase\":\"L4\"}", "data.phase", "enum",
		   "must be one of the allowed values");
	expect_one(pm, "{\"voltage_v\":230,\"current_a\":4,\"power_w\":9,"
		   "\"energy_wh\":1,\"alarms\":[\"tamper\",\"fire\"]}",
		   "data.alarms[1]", "enum", "must be one of the allowed values");
	expect_one(pm, "{\"voltage_v\":230,\"current_a\":4,\"power_w\":9,"
		   "\"energy_wh\":1,\"relay_closed\":1}", "data.relay_closed",
		   "type", "must be a boolean");

	expect_valid(reset, "{\"confirm\":true}");
	expect_one(reset, "{\"confirm\":false}", "data.confirm", "enum",
		   "must be one of the allowed values");

	expect_valid(ds, "{\"open\":false,\"battery_pct\":87,\"rssi_dbm\":-70,"
		     "\"events\":[{\"at\":1732345678123,\"kind\":\"opened\"},"
		     "{\"at\":1732345679000,\"kind\":\"closed\"}]}");
	assert_int_equal(check(ds, "{\"open\":\"yes\",\"events\":[{\"at\":-1,"
			       "\"kind\":\"opened\"},{\"kind\":\"slammed\","
			       "\"by\":\"wind\"}]}", errs), 5);
	assert_error(&errs[0], "data.open", "type", "must be a boolean");
	assert_error(&errs[1], "data.events[0].at", "minimum", "must be >= 0");
	assert_error(&errs[2], "data.events[1].kind", "enum",
		     "must be one of the allowed values");
	assert_error(&errs[3], "data.events[1].by", "additionalProperties",
		     "is not allowed");
	assert_error(&errs[4], "data.events[1].at", "required", "is required");
}

/* -------------------------------------------------------------- keywords */

static void test_utf8_length(void **state)
{
	(void)state;
	schema_set *set = one_type("{\"type\":\"string\",\"minLength\":2,"
				   "\"maxLength\":3}");
	const schema_node *n = telemetry_of(set, "t");

	expect_valid(n, "\"ab\"");
	expect_valid(n, "\"abc\"");
	/* 9 bytes, 3 code points. */
	expect_valid(n, "\"\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\"");
	/* U+1F600 is 4 bytes; two of them are 2 characters. */
	expect_valid(n, "\"\\ud83d\\ude00\\ud83d\\ude00\"");
	/* 2 bytes, 1 code point. */
	expect_one(n, "\"\xc3\xa9\"", "data", "minLength",
		   "must be at least 2 characters");
	expect_one(n, "\"\\ud83d\\ude00\"", "data", "minLength",
		   "must be at least 2 characters");
	expect_one(n, "\"\"", "data", "minLength", "must be at least 2 characters");
	expect_one(n, "\"abcd\"", "data", "maxLength",
		   "must be at most 3 characters");
	expect_one(n, "\"\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\"",
		   "data", "maxLength", "must be at most 3 characters");
	expect_one(n, "7", "data", "type", "must be a string");
	schema_set_free(set);
}

static void test_nested_arrays(void **state)
{
	(void)state;
	schema_set *set = one_type(
		"{\"type\":\"object\",\"properties\":{"
		" \"readings\":{\"type\":\"array\",\"maxItems\":3,"
		"  \"items\":{\"type\":\"object\",\"required\":[\"v\"],"
		"   \"properties\":{\"v\":{\"type\":\"integer\"},"
		"    \"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\","
		"     \"maxLength\":2}}}}},"
		" \"loc\":{\"type\":\"object\",\"properties\":{"
		"  \"geo\":{\"type\":\"object\",\"required\":[\"lat\"],"
		"   \"properties\":{\"lat\":{\"type\":\"number\",\"minimum\":-90,"
		"    \"maximum\":90}}}}}}}");
	const schema_node *n = telemetry_of(set, "t");
	schema_error errs[MAX_ERRS];

	expect_valid(n, "{\"readings\":[{\"v\":1},{\"v\":2,\"tags\":[\"a\"]}],"
		     "\"loc\":{\"geo\":{\"lat\":1.5}}}");
	expect_valid(n, "{\"readings\":[]}");
	assert_int_equal(check(n, "{\"readings\":[{\"v\":1},{\"v\":\"x\"},{},"
			       "{\"v\":4}]}", errs), 3);
	assert_error(&errs[0], "data.readings", "maxItems",
		     "must have at most 3 items");
	assert_error(&errs[1], "data.readings[1].v", "type",
		     "must be an integer");
	assert_error(&errs[2], "data.readings[2].v", "required", "is required");

	expect_one(n, "{\"readings\":[{\"v\":1,\"tags\":[\"ab\",\"abc\"]}]}",
		   "data.readings[0].tags[1]", "maxLength",
		   "must be at most 2 characters");
	expect_one(n, "{\"loc\":{\"geo\":{\"lat\":91}}}", "data.loc.geo.lat",
		   "maximum", "must be <= 90");
	expect_one(n, "{\"loc\":{\"geo\":{}}}", "data.loc.geo.lat", "required",
		   "is required");
	expect_one(n, "{\"readings\":{}}", "data.readings", "type",
		   "must be an array");
	schema_set_free(set);
}

static void test_pattern(void **state)
{
	(void)state;
	schema_set *set = one_type("{\"type\":\"string\",\"maxLength\":3,"
				   "\"pattern\":\"^a\"}");
	const schema_node *n = telemetry_of(set, "t");
	char msg[256];
	const char *ok[] = {
		"^[0-9a-f]{64}$",
		"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}\\\\.[A-Za-z]{2,63}$",
		"^[[:alpha:]][[:alnum:]_]{0,31}$",
		"^[]a-]{3}(x|y|z)*$",
		"^v[0-9]+\\\\.[0-9]+\\\\.[0-9]+(-[a-z0-9.]+)?$",
		"a{999}",
		"((a{1,10}){1,10}){1,8}",
	};

	expect_valid(n, "\"abc\"");
	expect_one(n, "\"bbb\"", "data", "pattern", "must match pattern ^a");
	/* A string over maxLength is not also matched against the pattern. */
	expect_one(n, "\"bbbb\"", "data", "maxLength",
		   "must be at most 3 characters");
	schema_set_free(set);

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		snprintf(msg, sizeof(msg), "{\"pattern\":\"%s\"}", ok[i]);
		schema_set_free(one_type(msg));
	}

	/* regcomp() would copy these into gigabytes (found by fuzzing). */
	expect_schema_error("{\"pattern\":\"^,a++++++++++++++++++++++++++++++++"
			    "++++++++++++++++++++++++++++++++++++++++++++++$\"}",
			    "docs[0]: telemetry.pattern: too complex (its "
			    "repetitions expand too far)");
	expect_schema_error("{\"pattern\":\"((a{99}){99}){99}\"}",
			    "docs[0]: telemetry.pattern: too complex (its "
			    "repetitions expand too far)");
	expect_schema_error("{\"pattern\":\"a{1000}\"}",
			    "docs[0]: telemetry.pattern: too complex (its "
			    "repetitions expand too far)");
	expect_schema_error("{\"pattern\":\"(a)\\\\1\"}",
			    "docs[0]: telemetry.pattern: back-references are not "
			    "supported");
	expect_schema_error("{\"pattern\":\"((((((((((((((((((((((((((((((((("
			    "a)))))))))))))))))))))))))))))))))\"}",
			    "docs[0]: telemetry.pattern: groups nested too deep");
	expect_schema_error("{\"pattern\":\"a\\u0000b\"}",
			    "docs[0]: telemetry.pattern: must be a string");
}

static void test_enum_mixed(void **state)
{
	(void)state;
	schema_set *set = one_type("{\"enum\":[1,\"a\",true,null,2.5,"
				   "{\"k\":[1,2]},[1,{\"x\":null}]]}");
	const schema_node *n = telemetry_of(set, "t");
	const char *ok[] = { "1", "\"a\"", "true", "null", "2.5",
			     "{\"k\":[1,2]}", "[1,{\"x\":null}]" };
	const char *bad[] = { "2", "\"A\"", "false", "1.0", "{\"k\":[2,1]}",
			      "{}", "[1]", "\"1\"", "0" };

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		expect_valid(n, ok[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_one(n, bad[i], "data", "enum",
			   "must be one of the allowed values");
	schema_set_free(set);
}

static void test_required_and_properties(void **state)
{
	/* Required names with and without a property schema, in any order. */
	schema_set *set = one_type(
		"{\"type\":\"object\",\"required\":[\"z\",\"a\",\"m\",\"b\"],"
		"\"properties\":{\"m\":{\"type\":\"integer\"},\"a\":{\"type\":"
		"\"string\"},\"q\":{\"type\":\"boolean\"}},"
		"\"additionalProperties\":false}");
	const schema_node *n = telemetry_of(set, "t");
	schema_error errs[MAX_ERRS];

	(void)state;
	expect_valid(n, "{\"z\":[],\"a\":\"x\",\"m\":1,\"b\":null}");
	expect_valid(n, "{\"z\":1,\"a\":\"\",\"m\":-1,\"b\":{},\"q\":true}");
	assert_int_equal(check(n, "{\"a\":1,\"q\":0,\"y\":0}", errs), 6);
	assert_error(&errs[0], "data.a", "type", "must be a string");
	assert_error(&errs[1], "data.q", "type", "must be a boolean");
	assert_error(&errs[2], "data.y", "additionalProperties", "is not allowed");
	assert_error(&errs[3], "data.z", "required", "is required");
	assert_error(&errs[4], "data.m", "required", "is required");
	assert_error(&errs[5], "data.b", "required", "is required");
	schema_set_free(set);
}

static void test_no_type_and_keyword_kinds(void **state)
{
	(void)state;
	/* Keywords apply only to their own kind of value. */
	schema_set *set = one_type("{\"minimum\":0,\"maxLength\":2,"
				   "\"maxItems\":1,\"required\":[\"a\"]}");
	const schema_node *n = telemetry_of(set, "t");

	expect_valid(n, "5");
	expect_valid(n, "\"ab\"");
	expect_valid(n, "[1]");
	expect_valid(n, "true");
	expect_valid(n, "null");
	expect_valid(n, "{\"a\":null}");
	expect_one(n, "-1", "data", "minimum", "must be >= 0");
	expect_one(n, "\"abc\"", "data", "maxLength",
		   "must be at most 2 characters");
	expect_one(n, "[1,2]", "data", "maxItems", "must have at most 1 items");
	expect_one(n, "{}", "data.a", "required", "is required");
	schema_set_free(set);
}

static void test_number_formatting(void **state)
{
	(void)state;
	schema_set *set = one_type(
		"{\"type\":\"object\",\"properties\":{"
		"\"a\":{\"maximum\":0.5},\"b\":{\"minimum\":0.1},"
		"\"c\":{\"maximum\":125.0},\"d\":{\"minimum\":-1e-7},"
		"\"e\":{\"maximum\":1e300},\"f\":{\"maximum\":9007199254740992},"
		"\"g\":{\"minimum\":0.5,\"type\":\"integer\"},"
		"\"h\":{\"maximum\":-9223372036854775808}}}");
	const schema_node *n = telemetry_of(set, "t");

	expect_one(n, "{\"a\":0.75}", "data.a", "maximum", "must be <= 0.5");
	expect_one(n, "{\"b\":0.09}", "data.b", "minimum", "must be >= 0.1");
	expect_one(n, "{\"c\":126}", "data.c", "maximum", "must be <= 125");
	expect_one(n, "{\"d\":-1}", "data.d", "minimum", "must be >= -1e-07");
	expect_one(n, "{\"e\":1e301}", "data.e", "maximum", "must be <= 1e+300");
	/* Integers compare exactly, beyond double precision. */
	expect_valid(n, "{\"f\":9007199254740992}");
	expect_one(n, "{\"f\":9007199254740993}", "data.f", "maximum",
		   "must be <= 9007199254740992");
	expect_valid(n, "{\"e\":9223372036854775807}");
	expect_one(n, "{\"g\":0}", "data.g", "minimum", "must be >= 0.5");
	expect_valid(n, "{\"g\":1}");
	expect_valid(n, "{\"h\":-9223372036854775808}");
	expect_one(n, "{\"h\":-9223372036854775807}", "data.h", "maximum",
		   "must be <= -9223372036854775808");
	expect_one(n, "{\"h\":-9.2e18}", "data.h", "maximum",
		   "must be <= -9223372036854775808");
	schema_set_free(set);
}

static void test_error_cap(void **state)
{
	(void)state;
	schema_set *set = one_type("{\"type\":\"object\","
				   "\"additionalProperties\":false}");
	const schema_node *n = telemetry_of(set, "t");
	schema_error errs[MAX_ERRS];
	json_t *v = json_object();
	char key[16];

	for (int i = 0; i < 1000; i++) {
		snprintf(key, sizeof(key), "k%d", i);
		json_object_set_new(v, key, json_integer(i));
	}
	assert_int_equal(schema_validate(n, v, "data", errs, MAX_ERRS), 64);
	assert_error(&errs[0], "data.k0", "additionalProperties",
		     "is not allowed");
	assert_error(&errs[63], "data.k63", "additionalProperties",
		     "is not allowed");

	/* Fewer slots than errors: the count is still the total. */
	memset(errs, 0, sizeof(errs));
	assert_int_equal(schema_validate(n, v, "data", errs, 2), 64);
	assert_string_equal(errs[1].path, "data.k1");
	assert_null(errs[2].code);
	assert_int_equal(schema_validate(n, v, "data", NULL, 5), 64);
	assert_int_equal(schema_validate(n, v, "data", errs, 0), 64);
	assert_int_equal(schema_validate(n, v, "data", errs, -3), 64);
	json_decref(v);
	schema_set_free(set);

	/* Array items: the walk stops too. */
	set = one_type("{\"type\":\"array\",\"items\":{\"type\":\"string\"}}");
	v = json_array();
	for (int i = 0; i < 100000; i++)
		json_array_append_new(v, json_integer(i));
	assert_int_equal(schema_validate(telemetry_of(set, "t"), v, "data", errs,
					 MAX_ERRS), 64);
	assert_error(&errs[63], "data[63]", "type", "must be a string");
	json_decref(v);
	schema_set_free(set);
}

static void test_deep_document(void **state)
{
	const schema_node *n = telemetry_of(*state, "thermostat");
	schema_error errs[MAX_ERRS];
	json_t *v = json_array(), *leaf = v;
	schema_set *set;
	char schema[8192], doc[8192];
	size_t off = 0, doff = 0;

	/* A value far deeper than any schema is not walked. */
	for (int i = 0; i < 5000; i++) {
		json_t *next = json_array();

		json_array_append_new(leaf, next);
		leaf = next;
	}
	assert_int_equal(schema_validate(n, v, "data", errs, MAX_ERRS), 1);
	assert_error(&errs[0], "data", "type", "must be an object");
	{
		json_t *o = json_pack("{s:f,s:O}", "temperature", 1.0, "deep", v);

		assert_int_equal(schema_validate(n, o, "data", errs, MAX_ERRS), 1);
		assert_error(&errs[0], "data.deep", "additionalProperties",
			     "is not allowed");
		json_decref(o);
	}
	json_decref(v);

	/* A schema 32 levels deep loads, validates, and cuts long paths. */
	for (int i = 0; i < 31; i++)
		off += (size_t)snprintf(schema + off, sizeof(schema) - off,
			"{\"type\":\"object\",\"properties\":{\"level_%02d\":", i);
	off += (size_t)snprintf(schema + off, sizeof(schema) - off,
				"{\"type\":\"integer\"}");
	for (int i = 0; i < 31; i++)
		off += (size_t)snprintf(schema + off, sizeof(schema) - off, "}}");
	set = one_type(schema);
	for (int i = 0; i < 31; i++)
		doff += (size_t)snprintf(doc + doff, sizeof(doc) - doff,
					 "{\"level_%02d\":", i);
	doff += (size_t)snprintf(doc + doff, sizeof(doc) - doff, "\"x\"");
	for (int i = 0; i < 31; i++)
		doff += (size_t)snprintf(doc + doff, sizeof(doc) - doff, "}");
	assert_int_equal(check(telemetry_of(set, "t"), doc, errs), 1);
	assert_string_equal(errs[0].code, "type");
	assert_int_equal(strlen(errs[0].path), sizeof(errs[0].path) - 1);
	assert_memory_equal(errs[0].path, "data.level_00.level_01.", 23);
	assert_string_equal(errs[0].path + sizeof(errs[0].path) - 4, "...");
	schema_set_free(set);

	/* 33 levels do not load. */
	off = 0;
	for (int i = 0; i < 32; i++)
		off += (size_t)snprintf(schema + off, sizeof(schema) - off,
			"{\"items\":");
	off += (size_t)snprintf(schema + off, sizeof(schema) - off, "{}");
	for (int i = 0; i < 32; i++)
		off += (size_t)snprintf(schema + off, sizeof(schema) - off, "}");
	{
		char expected[512] = "docs[0]: telemetry";

		for (int i = 0; i < 32; i++)
			strcat(expected, ".items");
		strcat(expected, ": nesting deeper than 32");
		expect_schema_error(schema, expected);
	}
}

static void test_path_truncation_utf8(void **state)
{
	(void)state;
	schema_set *set = one_type("{\"type\":\"object\","
				   "\"additionalProperties\":false}");
	schema_error errs[4];
	char key[400] = "";
	json_t *v = json_object();

	/* 2-byte characters straddle every cut point in turn. */
	for (int shift = 0; shift < 2; shift++) {
		size_t len = 0;

		if (shift)
			key[len++] = 'x';
		while (len < 300) {
			key[len++] = (char)0xc3;
			key[len++] = (char)0xa9;
		}
		key[len] = '\0';
		json_object_clear(v);
		assert_int_equal(json_object_set_new(v, key, json_true()), 0);
		assert_int_equal(schema_validate(telemetry_of(set, "t"), v, "data",
						 errs, 4), 1);
		assert_true(strlen(errs[0].path) < sizeof(errs[0].path));
		assert_string_equal(errs[0].path + strlen(errs[0].path) - 3, "...");
		/* Still valid UTF-8: jansson accepts it as a string. */
		{
			json_t *s = json_string(errs[0].path);

			assert_non_null(s);
			json_decref(s);
		}
	}
	json_decref(v);
	schema_set_free(set);
}

static void test_robustness(void **state)
{
	const schema_node *n = telemetry_of(*state, "thermostat");
	schema_error errs[MAX_ERRS];

	assert_int_equal(schema_validate(n, NULL, "data", errs, MAX_ERRS), 1);
	assert_error(&errs[0], "data", "required", "is required");
	assert_int_equal(schema_validate(NULL, NULL, "data", errs, MAX_ERRS), 0);
	assert_int_equal(schema_set_count(NULL), 0);
	assert_null(schema_set_at(NULL, 0));
	assert_null(schema_set_find(NULL, "x", 1));
	assert_null(schema_type_name(NULL));
	assert_null(schema_type_json(NULL));
	assert_null(schema_type_telemetry(NULL));
	schema_set_free(NULL);
	assert_null(schema_set_from_json(NULL, NULL, 0));
}

/* ----------------------------------------------------------- load errors */

static void test_load_errors_keywords(void **state)
{
	(void)state;
	expect_schema_error("{\"type\":\"object\",\"properties\":{\"temperature\":"
			    "{\"type\":\"number\",\"minimum\":\"x\"}}}",
			    "docs[0]: telemetry.properties.temperature.minimum: "
			    "must be a number");
	expect_schema_error("{\"maximum\":[1]}",
			    "docs[0]: telemetry.maximum: must be a number");
	expect_schema_error("{\"type\":\"float\"}",
			    "docs[0]: telemetry.type: must be one of \"object\", "
			    "\"number\", \"integer\", \"string\", \"boolean\", "
			    "\"array\"");
	expect_schema_error("{\"type\":[\"string\",\"null\"]}",
			    "docs[0]: telemetry.type: must be one of \"object\", "
			    "\"number\", \"integer\", \"string\", \"boolean\", "
			    "\"array\"");
	expect_schema_error("{\"properties\":[]}",
			    "docs[0]: telemetry.properties: must be an object");
	expect_schema_error("{\"properties\":{\"a\":1}}",
			    "docs[0]: telemetry.properties.a: must be an object");
	expect_schema_error("{\"required\":\"a\"}",
			    "docs[0]: telemetry.required: must be an array of "
			    "strings");
	expect_schema_error("{\"required\":[\"a\",1]}",
			    "docs[0]: telemetry.required: must be an array of "
			    "strings");
	expect_schema_error("{\"required\":[\"a\",\"a\"]}",
			    "docs[0]: telemetry.required: duplicate name \"a\"");
	expect_schema_error("{\"properties\":{\"a\":{},\"c\":{\"type\":\"string\"}},"
			    "\"required\":[\"c\",\"b\",\"a\",\"b\"]}",
			    "docs[0]: telemetry.required: duplicate name \"b\"");
	expect_schema_error("{\"properties\":{\"a\":{},\"c\":{\"type\":\"string\"}},"
			    "\"required\":[\"c\",\"a\",\"c\"]}",
			    "docs[0]: telemetry.required: duplicate name \"c\"");
	expect_schema_error("{\"additionalProperties\":{}}",
			    "docs[0]: telemetry.additionalProperties: must be a "
			    "boolean");
	expect_schema_error("{\"enum\":[]}",
			    "docs[0]: telemetry.enum: must be a non-empty array");
	expect_schema_error("{\"minLength\":-1}",
			    "docs[0]: telemetry.minLength: must be a non-negative "
			    "integer");
	expect_schema_error("{\"maxLength\":2.0}",
			    "docs[0]: telemetry.maxLength: must be a non-negative "
			    "integer");
	expect_schema_error("{\"maxItems\":\"3\"}",
			    "docs[0]: telemetry.maxItems: must be a non-negative "
			    "integer");
	expect_schema_error("{\"items\":[{}]}",
			    "docs[0]: telemetry.items: must be an object");
	expect_schema_error("{\"pattern\":5}",
			    "docs[0]: telemetry.pattern: must be a string");
	expect_schema_error("{\"minimum\":5,\"maximum\":4.5}",
			    "docs[0]: telemetry: minimum is greater than maximum");
	expect_schema_error("true", "docs[0]: telemetry: must be an object");
}

static void test_load_errors_documents(void **state)
{
	(void)state;
	char err[256] = "";
	json_t *docs;
	schema_set *set;

	expect_load_error("{\"telemetry\":{}}", "docs[0]: device_type: is required");
	expect_load_error("{\"device_type\":7,\"telemetry\":{}}",
			  "docs[0]: device_type: must be a string matching "
			  "[A-Za-z0-9._:-]{1,128}");
	expect_load_error("{\"device_type\":\"a b\",\"telemetry\":{}}",
			  "docs[0]: device_type: must be a string matching "
			  "[A-Za-z0-9._:-]{1,128}");
	expect_load_error("{\"device_type\":\"\",\"telemetry\":{}}",
			  "docs[0]: device_type: must be a string matching "
			  "[A-Za-z0-9._:-]{1,128}");
	expect_load_error("{\"device_type\":\"t\"}",
			  "docs[0]: telemetry: is required");
	expect_load_error("{\"device_type\":\"t\",\"telemetry\":[]}",
			  "docs[0]: telemetry: must be an object");
	expect_load_error("{\"device_type\":\"t\",\"telemetry\":{},"
			  "\"commands\":[]}", "docs[0]: commands: must be an object");
	expect_load_error("{\"device_type\":\"t\",\"telemetry\":{},"
			  "\"commands\":{\"reboot\":true}}",
			  "docs[0]: commands.reboot: must be an object");
	expect_load_error("{\"device_type\":\"t\",\"telemetry\":{},"
			  "\"commands\":{\"x\":{\"maxItems\":null}}}",
			  "docs[0]: commands.x.maxItems: must be a non-negative "
			  "integer");
	expect_load_error("[]", "docs[0]: must be an object");

	/* A maximal name is fine; commands are optional. */
	{
		char doc[512];

		snprintf(doc, sizeof(doc), "[{\"device_type\":\"%0128d\","
			 "\"telemetry\":{}}]", 0);
		docs = parse(doc);
		set = schema_set_from_json(docs, err, sizeof(err));
		assert_non_null(set);
		assert_int_equal(schema_set_count(set), 1);
		assert_null(schema_type_command(schema_set_at(set, 0), "reboot"));
		schema_set_free(set);
		json_decref(docs);
	}

	/* Duplicates, and errors name the right document. */
	docs = json_pack("[o,o,o]", parse("{\"device_type\":\"a\",\"telemetry\":{}}"),
			 parse(thermo_like), parse(thermo_like));
	set = schema_set_from_json(docs, err, sizeof(err));
	assert_null(set);
	assert_string_equal(err, "docs[2]: device_type \"thermostat\" is already "
			    "declared by docs[1]");
	json_decref(docs);

	docs = json_pack("[o,o]", parse(thermo_like),
			 parse("{\"device_type\":\"b\",\"telemetry\":{\"minimum\":{}}}"));
	set = schema_set_from_json(docs, err, sizeof(err));
	assert_null(set);
	assert_string_equal(err, "docs[1]: telemetry.minimum: must be a number");
	json_decref(docs);

	/* Not an array; and a NULL err is allowed. */
	docs = parse("{}");
	assert_null(schema_set_from_json(docs, err, sizeof(err)));
	assert_string_equal(err, "docs: must be an array");
	assert_null(schema_set_from_json(docs, NULL, 0));
	json_decref(docs);

	/* Cut messages stay valid UTF-8, whatever the buffer size. */
	{
		static const char *const chars[] = { "\xc3\xa9", "\xe2\x82\xac",
						     "\xf0\x9f\x98\x80" };
		char name[400] = "";

		for (int i = 0; i < 90; i++)
			strcat(name, chars[i % 3]);
		docs = json_pack("[{s:s, s:{s:[s,s]}}]", "device_type", "t",
				 "telemetry", "required", name, name);
		assert_non_null(docs);
		for (size_t size = 30; size < 300; size++) {
			char buf[300];
			json_t *str;

			assert_null(schema_set_from_json(docs, buf, size));
			assert_non_null(strstr(buf, "docs[0]: telemetry.required: "));
			str = json_string(buf);
			if (!str)
				fail_msg("not UTF-8 with size %zu: %s", size, buf);
			json_decref(str);
		}
		json_decref(docs);
	}

	/* A tiny err buffer is truncated, not overrun. */
	{
		char small[8];

		docs = json_pack("[o]", parse("{\"telemetry\":{}}"));
		assert_null(schema_set_from_json(docs, small, sizeof(small)));
		assert_string_equal(small, "docs[0]");
		json_decref(docs);
	}
}

static void test_load_dir_errors(void **state)
{
	(void)state;
	struct tmpdir d;
	char err[256] = "";
	schema_set *set;

	/* Bad keyword type, named by file and path. */
	tmp_make(&d);
	tmp_put(&d, "thermostat.json",
		"{\"device_type\":\"thermostat\",\"telemetry\":{\"type\":\"object\","
		"\"properties\":{\"temperature\":{\"type\":\"number\","
		"\"minimum\":\"x\"}}}}");
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_string_equal(err, "thermostat.json: telemetry.properties."
			    "temperature.minimum: must be a number");
	tmp_remove(&d);

	/* Bad regex. */
	tmp_make(&d);
	tmp_put(&d, "cam.json", "{\"device_type\":\"cam\",\"telemetry\":{},"
		"\"commands\":{\"snap\":{\"properties\":{\"id\":"
		"{\"pattern\":\"([a-z]\"}}}}}");
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_non_null(strstr(err, "cam.json: commands.snap.properties.id."
			       "pattern: invalid regular expression: "));
	tmp_remove(&d);

	/* Missing device_type. */
	tmp_make(&d);
	tmp_put(&d, "a.json", thermo_like);
	tmp_put(&d, "b.json", "{\"telemetry\":{}}");
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_string_equal(err, "b.json: device_type: is required");
	tmp_remove(&d);

	/* The same device_type in two files. */
	tmp_make(&d);
	tmp_put(&d, "z-thermo.json", thermo_like);
	tmp_put(&d, "a-thermo.json", thermo_like);
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_string_equal(err, "z-thermo.json: device_type \"thermostat\" is "
			    "already declared by a-thermo.json");
	tmp_remove(&d);

	/* Not JSON; duplicate keys; a file over 1 MiB. */
	tmp_make(&d);
	tmp_put(&d, "broken.json", "{\"device_type\":");
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_non_null(strstr(err, "broken.json: line 1 column "));
	tmp_remove(&d);

	tmp_make(&d);
	tmp_put(&d, "dup.json", "{\"device_type\":\"a\",\"device_type\":\"b\","
		"\"telemetry\":{}}");
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_non_null(strstr(err, "dup.json: line 1 "));
	assert_non_null(strstr(err, "duplicate"));
	tmp_remove(&d);

	tmp_make(&d);
	{
		size_t big = 1024 * 1024 + 1;
		char *text = malloc(big);

		assert_non_null(text);
		memset(text, ' ', big);
		memcpy(text, thermo_like, sizeof(thermo_like) - 1);
		tmp_write(&d, "big.json", text, big);
		assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
		assert_string_equal(err, "big.json: larger than 1048576 bytes");
		/* Exactly 1 MiB is fine. */
		tmp_write(&d, "big.json", text, big - 1);
		set = schema_set_load_dir(d.path, err, sizeof(err));
		assert_non_null(set);
		schema_set_free(set);
		free(text);
	}
	tmp_remove(&d);

	/* Only *.json files count (not hidden ones); a directory is an error. */
	tmp_make(&d);
	tmp_put(&d, "README.md", "not a schema");
	tmp_put(&d, ".hidden.json", "garbage");
	tmp_put(&d, "t.json~", "garbage");
	tmp_put(&d, "t.json", thermo_like);
	set = schema_set_load_dir(d.path, err, sizeof(err));
	assert_non_null(set);
	assert_int_equal(schema_set_count(set), 1);
	schema_set_free(set);
	{
		char p[256];

		snprintf(p, sizeof(p), "%s/sub.json", d.path);
		assert_int_equal(mkdir(p, 0700), 0);
	}
	assert_null(schema_set_load_dir(d.path, err, sizeof(err)));
	assert_string_equal(err, "sub.json: not a regular file");
	tmp_remove(&d);

	/* An empty directory is an empty set; a missing one is an error. */
	tmp_make(&d);
	set = schema_set_load_dir(d.path, err, sizeof(err));
	assert_non_null(set);
	assert_int_equal(schema_set_count(set), 0);
	assert_null(schema_set_find(set, "thermostat", 10));
	schema_set_free(set);
	tmp_remove(&d);
	assert_null(schema_set_load_dir("/nonexistent/schemas", err, sizeof(err)));
	assert_string_equal(err, "/nonexistent/schemas: No such file or directory");
	assert_null(schema_set_load_dir(NULL, err, sizeof(err)));
}

static void test_document_is_kept(void **state)
{
	(void)state;
	char err[256] = "";
	json_t *docs = parse("[{\"device_type\":\"t\",\"telemetry\":{\"enum\":[1]},"
			     "\"x-note\":\"kept\"}]");
	schema_set *set = schema_set_from_json(docs, err, sizeof(err));
	const json_t *doc;
	schema_error errs[MAX_ERRS];

	assert_non_null(set);
	/* The caller's array may go; the set keeps what it needs. */
	json_decref(docs);
	doc = schema_type_json(schema_set_at(set, 0));
	assert_string_equal(json_string_value(json_object_get(doc, "x-note")),
			    "kept");
	expect_valid(telemetry_of(set, "t"), "1");
	assert_int_equal(check(telemetry_of(set, "t"), "2", errs), 1);
	schema_set_free(set);
}

int main(void)
{
	const struct CMUnitTest deploy[] = {
		cmocka_unit_test(test_load_deploy),
		cmocka_unit_test(test_thermostat_valid),
		cmocka_unit_test(test_thermostat_bounds),
		cmocka_unit_test(test_thermostat_type_required_additional),
		cmocka_unit_test(test_commands),
		cmocka_unit_test(test_integer_vs_number),
		cmocka_unit_test(test_firmware_update),
		cmocka_unit_test(test_power_meter_and_door_sensor),
		cmocka_unit_test(test_deep_document),
		cmocka_unit_test(test_robustness),
	};
	const struct CMUnitTest inline_schemas[] = {
		cmocka_unit_test(test_utf8_length),
		cmocka_unit_test(test_nested_arrays),
		cmocka_unit_test(test_pattern),
		cmocka_unit_test(test_enum_mixed),
		cmocka_unit_test(test_required_and_properties),
		cmocka_unit_test(test_no_type_and_keyword_kinds),
		cmocka_unit_test(test_number_formatting),
		cmocka_unit_test(test_error_cap),
		cmocka_unit_test(test_path_truncation_utf8),
		cmocka_unit_test(test_load_errors_keywords),
		cmocka_unit_test(test_load_errors_documents),
		cmocka_unit_test(test_load_dir_errors),
		cmocka_unit_test(test_document_is_kept),
	};
	int failed = 0;

	failed += cmocka_run_group_tests_name("schema/deploy", deploy,
					      group_setup, group_teardown);
	failed += cmocka_run_group_tests_name("schema/inline", inline_schemas,
					      NULL, NULL);
	return failed ? 1 : 0;
}
