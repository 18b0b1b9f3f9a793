/*
 * admit.c - the admission checks of one reading (see admit.h).
 */
#include "protocols/admit.h"

#include <stdio.h>
#include <string.h>

const char *const hub_reject_names[HUB_REJ__COUNT] = {
	[HUB_REJ_NONE] = NULL,
	[HUB_REJ_INVALID] = "invalid",
	[HUB_REJ_UNKNOWN_DEVICE] = "unknown_device",
	[HUB_REJ_UNAUTHORIZED_DEVICE] = "unauthorized_device",
	[HUB_REJ_RATE_LIMITED] = "rate_limited",
	[HUB_REJ_CLOCK_SKEW] = "clock_skew",
	[HUB_REJ_BAD_SIGNATURE] = "bad_signature",
};

/* {"index":…,"device":…,"code":…,"message":…} */
static enum hub_reject_code refuse(hub_buf *b, size_t index, const gw_reading *rd,
				   enum hub_reject_code code, const char *message)
{
	gw_write_reading_reject(b, index, rd, hub_reject_names[code]);
	hub_buf_puts(b, ",\"message\":");
	hub_buf_json_str(b, message, strlen(message));
	hub_buf_puts(b, "}");
	return code;
}

/* {"index":…,"device":…,"code":"invalid","errors":[…]…} */
static enum hub_reject_code refuse_fields(hub_buf *b, size_t index, const gw_reading *rd,
					  const schema_error *errs, int nerr)
{
	gw_write_reading_reject(b, index, rd, hub_reject_names[HUB_REJ_INVALID]);
	gw_write_field_errors(b, errs, nerr < ADMIT_MAX_FIELD_ERRORS ? nerr : ADMIT_MAX_FIELD_ERRORS,
			      nerr);
	hub_buf_puts(b, "}");
	return HUB_REJ_INVALID;
}

enum hub_reject_code admit_reading(const struct admit_rules *rules, json_t *item, size_t index,
				   gw_reading *rd, struct admit_device *dev, hub_buf *rejected)
{
	schema_error errs[ADMIT_MAX_FIELD_ERRORS];
	int nerr;

	memset(dev, 0, sizeof(*dev));
	if (gw_reading_parse(item, rd, &errs[0]))
		return refuse_fields(rejected, index, rd, errs, 1);
	rules->lookup(rules->ctx, rd->device, rd->device_len, dev);
	if (dev->lost)
		return refuse(rejected, index, rd, HUB_REJ_UNKNOWN_DEVICE,
			      "device announced since by another connection; "
			      "announce it again to take it back");
	/* An announced device passed the token's claim at announce; only an
	 * unknown one needs it, to pick the code. */
	if (!dev->announced && rules->claim && !auth_patterns_match(rules->claim, rd->device))
		return refuse(rejected, index, rd, HUB_REJ_UNAUTHORIZED_DEVICE,
			      "device not allowed by the token's devices claim");
	if (!dev->announced)
		return refuse(rejected, index, rd, HUB_REJ_UNKNOWN_DEVICE,
			      "device not announced on this connection");
	if (rd->has_ts && (rd->ts > rules->now_ms + rules->skew_future_ms ||
			   rd->ts < rules->now_ms - rules->skew_past_ms)) {
		gw_write_reading_reject(rejected, index, rd, hub_reject_names[HUB_REJ_CLOCK_SKEW]);
		hub_buf_printf(rejected, ",\"message\":\"ts is outside [now-%llds, now+%llds]\","
			       "\"hub_time\":%lld}", (long long)(rules->skew_past_ms / 1000),
			       (long long)(rules->skew_future_ms / 1000), (long long)rules->now_ms);
		return HUB_REJ_CLOCK_SKEW;
	}
	if (!dev->type) {
		schema_error e = { .code = "device_type" };
		snprintf(e.path, sizeof(e.path), "device_type");
		snprintf(e.message, sizeof(e.message), "device type \"%.64s\" is no longer loaded",
			 dev->type_name ? dev->type_name : "");
		return refuse_fields(rejected, index, rd, &e, 1);
	}
	nerr = schema_validate(schema_type_telemetry(dev->type), rd->data, "data", errs,
			       ADMIT_MAX_FIELD_ERRORS);
	if (nerr)
		return refuse_fields(rejected, index, rd, errs, nerr);
	return HUB_REJ_NONE;
}

void admit_reject_rate_limited(hub_buf *rejected, size_t index, const gw_reading *rd,
			       int64_t retry_after_ms)
{
	gw_write_reading_reject(rejected, index, rd, hub_reject_names[HUB_REJ_RATE_LIMITED]);
	hub_buf_printf(rejected, ",\"retry_after_ms\":%lld}", (long long)retry_after_ms);
}

void admit_reject(hub_buf *rejected, size_t index, const gw_reading *rd,
		  enum hub_reject_code code, const char *message)
{
	refuse(rejected, index, rd, code, message);
}
