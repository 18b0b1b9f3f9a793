/* libFuzzer harness: libiothub-gw's spool replay (sdk/c/src/outbox.c). The
 * input is written as the only segment of a fresh spool directory, which is
 * then opened (replayed, torn tail cut), framed, acked and appended to: a
 * corrupt or hostile spool must never crash the gateway that reopens it. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sdk/c/src/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void rm_rf(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char p[4200];

	while (d && (de = readdir(d)))
		if (de->d_name[0] != '.') {
			snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
			unlink(p);
		}
	if (d)
		closedir(d);
	rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char dir[] = "/tmp/fuzz-sdk-spool-XXXXXX", path[4200], err[256];
	struct outbox o;
	int fd;

	if (size > (1u << 16) || !mkdtemp(dir))
		return 0;
	snprintf(path, sizeof(path), "%s/seg-0000000000000001.log", dir);
	fd = open(path, O_WRONLY | O_CREAT, 0600);
	if (fd >= 0) {
		if (write(fd, data, size) != (ssize_t)size)
			size = 0;
		close(fd);
	}
	if (!ob_open(&o, dir, 1u << 20, 4096, IOTHUB_GW_FSYNC_NONE, err, sizeof(err))) {
		for (size_t i = o.fr_head; i < o.fr_len; i++)
			(void)ob_frame_first(&o, &o.fr[i]);
		ob_append(&o, "{\"device\":\"d\",\"data\":{}}", 24, 1, err, sizeof(err));
		while (!ob_make_frame(&o, 7, 60000))
			;
		while (o.fr_len > o.fr_head)
			ob_acked(&o, o.fr[o.fr_head].seq);
		ob_close(&o);
	}
	rm_rf(dir);
	return 0;
}
