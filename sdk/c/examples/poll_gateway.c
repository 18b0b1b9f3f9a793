/*
 * poll_gateway.c - libiothub-gw driven from the application's own poll()
 * loop, with no thread of the library's (docs/sdk.md, "Foreign event
 * loops"). One loop waits on standard input and the gateway's descriptor:
 * each input line "DEVICE TEMPERATURE" becomes a thermostat reading, and
 * the reboot command is answered. At the end of input the loop goes on
 * until the hub acked everything (or 30 s passed), then exits.
 *
 *   printf 't-1 21.5\nt-1 21.7\n' | poll_gateway URL TOKEN SPOOL_DIR
 *
 * Build against an installed SDK:
 *   cc poll_gateway.c $(pkg-config --cflags --libs iothub-gw) -o poll_gateway
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <iothub/gateway.h>

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void on_reboot(struct iothub_gw *gw, const struct iothub_gw_command *c, void *user)
{
	iothub_gw_cmd_succeeded(gw, c->id, NULL);
}

/* the devices announced so far (a few: this is an example) */
static char devices[64][129];
static int ndevices;

static int known(const char *dev)
{
	for (int i = 0; i < ndevices; i++)
		if (!strcmp(devices[i], dev))
			return 1;
	return 0;
}

static void remember(const char *dev)
{
	if (ndevices < 64)
		snprintf(devices[ndevices++], sizeof(devices[0]), "%s", dev);
}

/* One input line: "DEVICE TEMPERATURE". Returns 0, or -1 when it was not
 * accepted (the reason on stderr). */
static int line_to_reading(struct iothub_gw *gw, char *line)
{
	char dev[129], data[64], err[256];
	double t;

	if (sscanf(line, "%128s %lf", dev, &t) != 2) {
		fprintf(stderr, "poll_gateway: skipped '%s': want DEVICE TEMPERATURE\n", line);
		return -1;
	}
	if (!known(dev)) {
		/* announced once here; the library announces it again after
		 * every reconnect */
		if (iothub_gw_announce(gw, dev, "thermostat", NULL, err, sizeof(err))) {
			fprintf(stderr, "poll_gateway: %s\n", err);
			return -1;
		}
		remember(dev);
	}
	snprintf(data, sizeof(data), "{\"temperature\":%.2f}", t);
	if (iothub_gw_send(gw, dev, now_ms(), data, err, sizeof(err))) {
		fprintf(stderr, "poll_gateway: %s\n", err);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct iothub_gw_opts o = { 0 };
	struct iothub_gw_stats st;
	struct iothub_gw *gw;
	char err[256], buf[4096];
	size_t have = 0;
	int64_t give_up = 0;
	int input_open = 1;
	short ev;

	if (argc != 4) {
		fprintf(stderr, "usage: poll_gateway URL TOKEN SPOOL_DIR < lines\n");
		return 1;
	}
	o.url = argv[1];
	o.token = argv[2];
	o.spool_dir = argv[3];
	o.fsync = IOTHUB_GW_FSYNC_BATCH;
	gw = iothub_gw_new(&o, err, sizeof(err));
	if (!gw) {
		fprintf(stderr, "poll_gateway: %s\n", err);
		return 1;
	}
	iothub_gw_on_command(gw, "reboot", on_reboot, NULL);

	struct pollfd p[2] = {
		{ .fd = iothub_gw_fd(gw, &ev) },
		{ .fd = STDIN_FILENO, .events = POLLIN },
	};
	p[0].events = ev;
	for (;;) {
		/* the gateway's own timers bound the wait */
		if (poll(p, input_open ? 2 : 1, iothub_gw_next_timeout(gw)) < 0)
			break;
		if (input_open && p[1].revents) {
			ssize_t n = read(STDIN_FILENO, buf + have, sizeof(buf) - 1 - have);
			char *nl, *start = buf;

			if (n <= 0) {
				input_open = 0;
				give_up = now_ms() + 30000;
			} else {
				have += (size_t)n;
				buf[have] = 0;
				while ((nl = strchr(start, '\n'))) {
					*nl = 0;
					line_to_reading(gw, start);
					start = nl + 1;
				}
				have -= (size_t)(start - buf);
				memmove(buf, start, have);
				if (have == sizeof(buf) - 1)
					have = 0;   /* a line longer than the buffer: dropped */
			}
		}
		/* ready or timed out: either way the gateway gets its turn */
		iothub_gw_service(gw, 0);
		if (!input_open) {
			iothub_gw_stats(gw, &st);
			if (!st.pending || now_ms() > give_up)
				break;
		}
	}
	iothub_gw_stats(gw, &st);
	printf("accepted %llu acked %llu pending %llu\n", (unsigned long long)st.accepted,
	       (unsigned long long)st.acked, (unsigned long long)st.pending);
	iothub_gw_free(gw);
	return st.pending ? 2 : 0;
}
