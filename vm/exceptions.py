"""Errors of the vm package, rooted by cause.

VmError                   root of every error raised by ``vm``
├── GuestDataError        untrusted data: a line, file or ``shutdown_message``
│                         from a guest that is not what the contract allows
│                         (also a ``ValueError``; the text says why)
├── QemuError             qemu or qemu-img could not start, answer QMP, or do
│                         what was asked within its deadline (transport to a child)
├── MigrationError        a migration's peer: its relay could not be reached, did
│                         not answer in time, or refused the stream (a different
│                         key: a wrong or forged public key) (transport to a peer)
├── VmRefused             the node will not start this VM: the image is unknown
│   │                     or refused by the site policy, no cores are free, the
│   │                     VM type is backed off (the text says which and why)
│   ├── ImageRefused      the site policy refuses the image (its reason)
│   ├── BackedOff         the VM type is backed off after an abort (until when)
│   └── NoFreeCores       not enough of the lease's cores are free now
├── VmConfigError         local misuse: a ``[vm]`` key or a request value is bad
│                         (names the key or field and what it accepts)
└── UnknownVm             no VM with that id on this node

Foreign errors (``OSError``, qemu.qmp's, ``asyncio.TimeoutError``) are mapped
to these where they cross a public function; each such function says what it
raises.
"""


class VmError(Exception):
    """Root of every error raised by ``vm``."""


class GuestDataError(VmError, ValueError):
    """Data from a guest that the contract does not allow (the text says why)."""


class QemuError(VmError):
    """qemu or qemu-img failed or did not answer within its deadline."""


class QemuExited(QemuError):
    """qemu ended before it answered on QMP (it printed why on its log)."""


class MigrationError(VmError):
    """A migration's peer could not be reached, did not answer, or refused the stream."""


class VmRefused(VmError):
    """The node will not start this VM; the text says why."""


class ImageRefused(VmRefused):
    """The site's image policy refuses the image (the policy's reason)."""


class BackedOff(VmRefused):
    """The VM type aborted recently and is backed off (Vac's back-off); the text says until when."""


class NoFreeCores(VmRefused):
    """The cores asked are not free of the lease's now (held by VMs, node jobs, site ranges)."""


class VmConfigError(VmError):
    """A ``[vm]`` key or a request field has a bad value (one line naming it)."""


class UnknownVm(VmError):
    """No VM with that id on this node."""
