// A developer's probe of chains of dependent launches (built with MOEFLUX_CUDA_WAIT_TRACE): thread 0 of
// each block of every kernel records, at the kernel's dependent-launch wait (device_common.cuh), when it
// got there and when it was let go. Host code: enable a device buffer, run the chain, read it back.
#pragma once

#include <cstdint>

namespace moeflux::cuda {

constexpr int wait_marks = 8;  // points a kernel may mark (wait_trace_mark's k)

struct WaitRecord {
  unsigned long long grid;     // %gridid: one per launch, increasing in launch order
  unsigned long long arrive;   // %globaltimer (ns) at the wait
  unsigned long long release;  // and after it
  unsigned block, sm;
  unsigned long long marks[wait_marks];  // wait_trace_mark's points in a kernel that sets them (0: none)
  unsigned long long clock_release, clock_mark;  // the SM's clock64 after the wait and at the last mark
};

struct WaitTrace {
  unsigned n, capacity;  // records written (may pass capacity: the rest were dropped), room
  WaitRecord records[1];
};

// Each .cu file's kernels read their own copy of the buffer's address: the files register a setter, and
// enable_wait_trace calls every one (nullptr turns the probe off). Without MOEFLUX_CUDA_WAIT_TRACE no file
// registers, and enable_wait_trace reports false.
int register_wait_trace_setter(void (*set)(WaitTrace*));
bool enable_wait_trace(WaitTrace* device_buffer);

}  // namespace moeflux::cuda
