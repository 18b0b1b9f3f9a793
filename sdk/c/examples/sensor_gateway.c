/*
 * sensor_gateway.c - a minimal gateway on libiothub-gw (docs/sdk.md): reads a
 * temperature from a sensor file (one number per read, in °C, or in m°C as
 * /sys/class/thermal/thermal_zone0/temp has it) every interval, streams it as
 * a thermostat's reading, and handles the thermostat's commands: reboot,
 * config (a setpoint, kept) and firmware_update (progress in steps of 20 %).
 *
 *   sensor_gateway URL TOKEN SPOOL_DIR DEVICE SENSOR_FILE [INTERVAL_MS]
 *   e.g. sensor_gateway ws://127.0.0.1:8080/v1/gateway "$TOKEN" /tmp/gw-spool t-1 /tmp/temp
 *
 * Build against an installed SDK:
 *   cc sensor_gateway.c $(pkg-config --cflags --libs iothub-gw) -o sensor_gateway
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <iothub/gateway.h>

static volatile sig_atomic_t stop;
static double setpoint = 21.0;

/* one firmware update at a time, advanced from the main loop */
static struct {
	char id[72];
	char version[72];
	int progress;     /* -1: none */
} fw = { .progress = -1 };

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void on_stop(int sig)
{
	stop = 1;
}

static void on_reboot(struct iothub_gw *gw, const struct iothub_gw_command *c, void *user)
{
	printf("reboot requested (%s): a real gateway would reboot after acking\n", c->params_json);
	iothub_gw_cmd_succeeded(gw, c->id, NULL);
}

static void on_config(struct iothub_gw *gw, const struct iothub_gw_command *c, void *user)
{
	const char *p = strstr(c->params_json, "\"setpoint\":");
	char result[64];

	if (!p) {
		iothub_gw_cmd_rejected(gw, c->id, "no setpoint");
		return;
	}
	setpoint = atof(p + 11);
	snprintf(result, sizeof(result), "{\"setpoint\":%.2f}", setpoint);
	iothub_gw_cmd_succeeded(gw, c->id, result);
}

static void on_firmware(struct iothub_gw *gw, const struct iothub_gw_command *c, void *user)
{
	const char *v = strstr(c->params_json, "\"version\":\"");

	if (fw.progress >= 0) {
		iothub_gw_cmd_rejected(gw, c->id, "an update is running");
		return;
	}
	snprintf(fw.id, sizeof(fw.id), "%s", c->id);
	snprintf(fw.version, sizeof(fw.version), "%.*s", v ? (int)strcspn(v + 11, "\"") : 1,
		 v ? v + 11 : "?");
	fw.progress = 0;
	iothub_gw_cmd_in_progress(gw, c->id, 0, "downloading");
}

static void on_cancel(struct iothub_gw *gw, const char *id, const char *device, void *user)
{
	if (fw.progress >= 0 && !strcmp(id, fw.id)) {
		printf("firmware update %s canceled\n", id);
		fw.progress = -1;
	}
}

static void on_reject(struct iothub_gw *gw, const struct iothub_gw_reject *r, void *user)
{
	fprintf(stderr, "rejected (%s): %s\n", r->code, r->detail_json);
}

static void on_state(struct iothub_gw *gw, enum iothub_gw_state s, int code, const char *why,
		     void *user)
{
	static const char *const names[] = { "connecting", "online", "disconnected" };

	fprintf(stderr, "gateway %s %d %s\n", names[s], code, why);
}

int main(int argc, char **argv)
{
	struct iothub_gw_opts o = { 0 };
	struct iothub_gw *gw;
	char err[256];
	int interval = argc > 6 ? atoi(argv[6]) : 1000;
	int64_t next = 0, fw_next = 0;

	if (argc < 6) {
		fprintf(stderr, "usage: %s URL TOKEN SPOOL_DIR DEVICE SENSOR_FILE [INTERVAL_MS]\n",
			argv[0]);
		return 2;
	}
	o.url = argv[1];
	o.token = argv[2];
	o.spool_dir = argv[3];
	o.fsync = IOTHUB_GW_FSYNC_BATCH;
	o.on_reject = on_reject;
	o.on_state = on_state;
	gw = iothub_gw_new(&o, err, sizeof(err));
	if (!gw) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	iothub_gw_on_command(gw, "reboot", on_reboot, NULL);
	iothub_gw_on_command(gw, "config", on_config, NULL);
	iothub_gw_on_command(gw, "firmware_update", on_firmware, NULL);
	iothub_gw_on_cancel(gw, on_cancel, NULL);
	if (iothub_gw_announce(gw, argv[4], "thermostat", "{\"example\":\"c\"}", err, sizeof(err))) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	signal(SIGINT, on_stop);
	signal(SIGTERM, on_stop);
	while (!stop) {
		int64_t t = now_ms();

		if (t >= next) {
			FILE *f = fopen(argv[5], "r");
			double v;
			char data[64];

			if (f && fscanf(f, "%lf", &v) == 1) {
				if (v > 1000)
					v /= 1000;   /* m°C */
				snprintf(data, sizeof(data), "{\"temperature\":%.2f}", v);
				int rc = iothub_gw_send(gw, argv[4], t, data, err, sizeof(err));
				if (rc)
					fprintf(stderr, "not accepted: %s\n", err);
			}
			if (f)
				fclose(f);
			next = t + interval;
		}
		if (fw.progress >= 0 && t >= fw_next) {
			fw.progress += 20;
			if (fw.progress >= 100) {
				char result[128];

				snprintf(result, sizeof(result), "{\"version\":\"%s\"}", fw.version);
				iothub_gw_cmd_succeeded(gw, fw.id, result);
				fw.progress = -1;
			} else {
				iothub_gw_cmd_in_progress(gw, fw.id, fw.progress, "installing");
			}
			fw_next = t + 500;
		}
		iothub_gw_service(gw, 100);
	}
	iothub_gw_flush(gw, 2000);   /* what is not acked stays in the spool */
	iothub_gw_free(gw);
	return 0;
}
