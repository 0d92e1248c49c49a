"""The seed program: list the devices, double a tensor on every one of them."""

import torch

import torchpmap

devices = torchpmap.devices()
print(f"{len(devices)} devices:", ", ".join(str(d) for d in devices))

n = torchpmap.local_device_count()
x = torch.arange(n * 3).reshape(n, 3)
y = torchpmap.pmap(lambda x: x * 2)(x)

print(y)
print("type:   ", type(y).__name__)
print("shape:  ", tuple(y.shape))
print("devices:", [str(d) for d in y.devices])
assert torch.equal(y.unshard(), x * 2)
