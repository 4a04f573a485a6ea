// cuDeviceGetAttribute's table for the stand-in's device (an H100 SXM5).
#include "device.h"

namespace standin {

int device_attribute(int attr) {
    switch (attr) {
        case 1: return MAX_THREADS_PER_BLOCK;          // MAX_THREADS_PER_BLOCK
        case 2: case 3: return 1024;                   // MAX_BLOCK_DIM_X/Y
        case 4: return 64;                             // MAX_BLOCK_DIM_Z
        case 5: return 2147483647;                     // MAX_GRID_DIM_X
        case 6: case 7: return 65535;                  // MAX_GRID_DIM_Y/Z
        case 8: return SHARED_PER_BLOCK;               // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: return 65536;                          // TOTAL_CONSTANT_MEMORY
        case 10: return 32;                            // WARP_SIZE
        case 12: return 65536;                         // MAX_REGISTERS_PER_BLOCK
        case 13: return 1980000;                       // CLOCK_RATE (kHz)
        case 14: return 512;                           // TEXTURE_ALIGNMENT
        case 15: return 1;                             // GPU_OVERLAP
        case 16: return SM_COUNT;                      // MULTIPROCESSOR_COUNT
        case 31: return 1;                             // CONCURRENT_KERNELS
        case 36: return 2619000;                       // MEMORY_CLOCK_RATE
        case 37: return 5120;                          // GLOBAL_MEMORY_BUS_WIDTH
        case 38: return 50 << 20;                      // L2_CACHE_SIZE
        case 39: return 2048;                          // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: return 3;                             // ASYNC_ENGINE_COUNT
        case 41: return 1;                             // UNIFIED_ADDRESSING
        case 75: return 9;                             // COMPUTE_CAPABILITY_MAJOR
        case 76: return 0;                             // COMPUTE_CAPABILITY_MINOR
        case 81: return SHARED_PER_SM;                 // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: return 65536;                         // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: return 1;                             // MANAGED_MEMORY
        case 97: return SHARED_PER_BLOCK_OPTIN;        // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: return 32;                           // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 115: return 1;                            // MEMORY_POOLS_SUPPORTED
        default: return 0;
    }
}

}  // namespace standin
