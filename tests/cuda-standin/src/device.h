// The device the CUDA stand-in describes: an H100 SXM5's limits and attributes.
#pragma once

namespace standin {

constexpr int SM_COUNT = 132;
constexpr int MAX_THREADS_PER_BLOCK = 1024;
constexpr int SHARED_PER_BLOCK = 48 << 10;
constexpr int SHARED_PER_BLOCK_OPTIN = 232448;
constexpr int SHARED_PER_SM = 233472;

// cuDeviceGetAttribute's answer for attribute `attr` (0 for one it does not describe).
int device_attribute(int attr);

}  // namespace standin
