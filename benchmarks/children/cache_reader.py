"""P8's child: fill the cgroup's file cache by reading argv[1], touch 40 MiB of anon memory, say
"ready", then wait to be killed."""

import sys
import time

with open(sys.argv[1], "rb") as f:  # kept open while it waits, as the inline program did
    while f.read(1 << 20):
        pass
    buf = bytearray(40 << 20)
    buf[::4096] = b"x" * (len(buf) // 4096)
    print("ready", flush=True)
    time.sleep(120)
