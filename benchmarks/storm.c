/* A page-fault storm: map, touch every page, unmap, repeat. Prints seconds. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
	int rounds = argc > 2 ? atoi(argv[2]) : 20;
	size_t len = mib << 20;
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	for (int r = 0; r < rounds; r++) {
		char *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return 1;
		for (size_t off = 0; off < len; off += 4096)
			p[off] = 1;
		munmap(p, len);
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.6f %zu\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9, (len / 4096) * rounds);
	return 0;
}
