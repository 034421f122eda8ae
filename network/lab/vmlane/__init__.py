"""The Linux-bridge lane: a namespace fabric for kernels with 802.1Q, and the QEMU guest runner around it.

``scripts/vm-lane.sh`` boots Debian's stock kernel with virtme-ng (this machine's kernel has no 802.1Q) and
runs ``guest.sh`` inside it. No Django, no database here: the lane tests the drivers and the packets only.
"""
