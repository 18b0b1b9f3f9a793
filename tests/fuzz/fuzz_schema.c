/*
 * fuzz_schema.c - libFuzzer harness for protocols/schema.c.
 *
 * The input is parsed as JSON and then used four ways:
 *  1. as a value, validated against the thermostat's telemetry and commands;
 *  2. as a device-type document (schema_set_from_json of [input]);
 *  3. as a schema: wrapped into {"device_type","telemetry","commands"} (for an
 *     array input, its first element is the schema and the rest are values
 *     validated against it), so the compiler sees arbitrary keyword trees;
 *  4. for an array input, as the docs array itself (duplicates, many types).
 * Invariants of every result are checked; a violation aborts.
 *
 * Build: tests/fuzz/build.sh. Run, e.g.:
 *   build-fuzz/fuzz_schema -max_total_time=60 build-fuzz/corpus/fuzz_schema \
 *       deploy/device-types
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "protocols/schema.h"

#define ERRS 8

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* deploy/device-types/thermostat.json, verbatim. */
static const char thermostat[] =
	"[{\"device_type\": \"thermostat\","
	" \"telemetry\": { \"type\": \"object\", \"required\": [\"temperature\"],"
	"  \"properties\": { \"temperature\": { \"type\": \"number\", \"minimum\": -40, \"maximum\": 125 },"
	"                  \"humidity\": { \"type\": \"number\", \"minimum\": 0, \"maximum\": 100 } },"
	"  \"additionalProperties\": false },"
	" \"commands\": {"
	"  \"reboot\": { \"type\": \"object\", \"properties\": { \"delay_s\": { \"type\": \"integer\", \"minimum\": 0, \"maximum\": 3600 } } },"
	"  \"config\": { \"type\": \"object\", \"properties\": { \"setpoint\": { \"type\": \"number\", \"minimum\": 5, \"maximum\": 35 } }, \"additionalProperties\": false },"
	"  \"firmware_update\": { \"type\": \"object\", \"required\": [\"url\", \"version\", \"sha256\"],"
	"   \"properties\": { \"url\": { \"type\": \"string\", \"pattern\": \"^https://\" },"
	"                   \"version\": { \"type\": \"string\", \"maxLength\": 64 },"
	"                   \"sha256\": { \"type\": \"string\", \"pattern\": \"^[0-9a-f]{64}$\" },"
	"                   \"size_bytes\": { \"type\": \"integer\", \"minimum\": 1 } } } } }]";

static const char *const commands[] = { "reboot", "config", "firmware_update",
					"c", "unknown" };

static schema_set *thermo;

static void check(int cond, const char *what)
{
	if (!cond) {
		fprintf(stderr, "fuzz_schema: invariant broken: %s\n", what);
		abort();
	}
}

/* Built once, before any input, so it never counts as an input's leak. */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char err[256];
	json_t *docs = json_loads(thermostat, 0, NULL);

	(void)argc;
	(void)argv;
	check(docs != NULL, "thermostat JSON parses");
	thermo = schema_set_from_json(docs, err, sizeof(err));
	json_decref(docs);
	check(thermo != NULL, "thermostat loads");
	return 0;
}

static void validate(const schema_node *node, const json_t *value)
{
	schema_error errs[ERRS];
	int n;

	if (!node)
		return;
	memset(errs, 0xA5, sizeof(errs));
	n = schema_validate(node, value, "data", errs, ERRS);
	check(n >= 0 && n <= 64, "error count in [0, 64]");
	for (int i = 0; i < n && i < ERRS; i++) {
		json_t *s;

		check(errs[i].code != NULL, "code set");
		check(memchr(errs[i].path, 0, sizeof(errs[i].path)) != NULL,
		      "path terminated");
		check(memchr(errs[i].message, 0, sizeof(errs[i].message)) != NULL,
		      "message terminated");
		check(strncmp(errs[i].path, "data", 4) == 0, "path has prefix");
		/* What the hub echoes to gateways must stay valid UTF-8. */
		s = json_string(errs[i].path);
		check(s != NULL, "path is UTF-8");
		json_decref(s);
		s = json_string(errs[i].message);
		check(s != NULL, "message is UTF-8");
		json_decref(s);
	}
	/* Fewer slots give the same count. */
	check(schema_validate(node, value, "data", errs, 1) == n, "same count");
	check(schema_validate(node, value, NULL, NULL, 0) == n, "count only");
}

static void validate_type(const schema_type *t, const json_t *value)
{
	validate(schema_type_telemetry(t), value);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		validate(schema_type_command(t, commands[i]), value);
}

static void validate_set(const schema_set *set, const json_t *value)
{
	for (size_t i = 0; i < schema_set_count(set); i++) {
		const schema_type *t = schema_set_at(set, i);
		const char *name = schema_type_name(t);

		check(schema_set_find(set, name, strlen(name)) != NULL, "find");
		validate_type(t, value);
	}
}

static schema_set *load(const json_t *docs)
{
	char err[128];
	schema_set *set;

	err[0] = '\0';
	set = schema_set_from_json(docs, err, sizeof(err));
	check(set != NULL || err[0] != '\0', "failure has a reason");
	return set;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *v, *docs, *schema, *doc;
	schema_set *set;

	v = json_loadb((const char *)data, size,
		       JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL,
		       NULL);
	if (!v)
		return 0;

	/* 1. A value against the thermostat. */
	validate_set(thermo, v);

	/* 2. The input as a device-type document. */
	docs = json_pack("[O]", v);
	set = load(docs);
	validate_set(set, v);
	schema_set_free(set);
	json_decref(docs);

	/* 3. The input (or its first element) as a schema. */
	schema = json_is_array(v) && json_array_size(v) > 0 ?
		 json_array_get(v, 0) : v;
	doc = json_pack("{s:s, s:O, s:{s:O}}", "device_type", "fuzz",
			"telemetry", schema, "commands", "c", schema);
	docs = json_pack("[o]", doc);
	set = load(docs);
	if (set) {
		const schema_type *t = schema_set_find(set, "fuzz", 4);

		check(t != NULL, "fuzz type found");
		if (json_is_array(v) && json_array_size(v) > 1) {
			for (size_t i = 1; i < json_array_size(v); i++)
				validate_type(t, json_array_get(v, i));
		} else {
			validate_type(t, v);
		}
		schema_set_free(set);
	}
	json_decref(docs);

	/* 4. An array input as the list of documents. */
	if (json_is_array(v)) {
		set = load(v);
		validate_set(set, v);
		schema_set_free(set);
	}

	json_decref(v);
	return 0;
}
