/*
 * schema.h - device types and the JSON Schema subset of docs/device-types.md.
 *
 * A schema_set is an immutable, compiled set of device types loaded from one
 * directory (one *.json file per type). The hub holds one current set and
 * swaps it whole on SIGHUP; a set is never modified after load, so lookups
 * and validation need no locking and may be called from any lws callback.
 *
 * Supported keywords: type (object, number, integer, string, boolean, array),
 * properties, required, additionalProperties (boolean), minimum, maximum,
 * enum, minLength, maxLength, pattern (POSIX extended regex, compiled once at
 * load), items, maxItems. Unknown keywords are ignored. No libwebsockets here.
 */
#ifndef HUB_SCHEMA_H
#define HUB_SCHEMA_H

#include <stddef.h>
#include <jansson.h>

typedef struct schema_set schema_set;
typedef struct schema_type schema_type;
typedef struct schema_node schema_node;

/* One validation error. `code` is the failing keyword ("type", "required",
 * "additionalProperties", "minimum", "maximum", "enum", "minLength",
 * "maxLength", "pattern", "maxItems") and points to static storage. */
typedef struct schema_error {
	char path[128];      /* e.g. "data.temperature", "params.values[3]" */
	const char *code;
	char message[128];   /* e.g. "must be <= 125" */
} schema_error;

/* Loads every *.json file of `dir`. Returns a new set, or NULL with a one-line
 * reason in err (file name and what is wrong) if any file is unreadable, is
 * not a valid device type, or two files declare the same device_type.
 * Caller frees with schema_set_free(). Not for a hot path (reads files). */
schema_set *schema_set_load_dir(const char *dir, char *err, size_t errlen);

/* Builds a set from already-parsed documents (tests, fuzzing). `docs` is a
 * JSON array of device-type objects; borrowed. Same errors as load_dir. */
schema_set *schema_set_from_json(const json_t *docs, char *err, size_t errlen);

/* NULL-safe. */
void schema_set_free(schema_set *set);

size_t schema_set_count(const schema_set *set);
const schema_type *schema_set_at(const schema_set *set, size_t i);

/* Looks a type up by name (not NUL-terminated: len bytes). NULL if absent. */
const schema_type *schema_set_find(const schema_set *set, const char *name,
				   size_t len);

/* Name of the type; lives as long as the set. */
const char *schema_type_name(const schema_type *t);

/* The device-type document as loaded (borrowed; lives as long as the set). */
const json_t *schema_type_json(const schema_type *t);

/* The anomaly rules of its telemetry fields (`x-anomaly`, hub/anomaly.h),
 * or NULL when it marks no field; lives as long as the set. */
struct anom_spec;
const struct anom_spec *schema_type_anomaly(const schema_type *t);

/* The compiled `telemetry` schema, never NULL. */
const schema_node *schema_type_telemetry(const schema_type *t);

/* The compiled schema of command `name` (NUL-terminated), or NULL when the
 * type does not declare that command. */
const schema_node *schema_type_command(const schema_type *t, const char *name);

/* Validates `value` against `node`. Error paths start with `prefix` (e.g.
 * "data" or "params"). Fills at most max_errs entries of errs and returns the
 * total number of errors found (0 = valid); stops after a small internal
 * limit so a hostile document cannot cost more than a bounded walk. */
int schema_validate(const schema_node *node, const json_t *value,
		    const char *prefix, schema_error *errs, int max_errs);

#endif
