"""Ahead-of-time compile report of the shipped Triton kernels (registers, spills, shared memory, warps)
for a target GPU, without one: the logic is `mixcon.ops.kernel_report`.

    python tools/kernel_report.py --arch sm_90
"""

from mixcon.ops.kernel_report import main

if __name__ == "__main__":
    main()
