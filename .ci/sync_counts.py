"""Count host reads of tensor values (each a device sync on CUDA) per training_losses call and per
sampling step, for the ddpm_lib at REPO_PATH: python .ci/sync_counts.py REPO_PATH [dev].

With "dev", value checks take the device path (checks.on_host -> False), as they do on CUDA. The
patched methods are those of tests/test_sampler_api.py::host_reads. Used for the issue-11 note."""
import sys, torch
sys.path.insert(0, sys.argv[1])
device_path = len(sys.argv) > 2
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.schedules import linear_betas
from ddpm_lib.samplers import ddpm_sample, ddim_sample, dpm_solver_pp_sample
from ddpm_lib.models import MLPConfig, MLPDenoiser
if device_path:
    from ddpm_lib import checks; checks.on_host = lambda x: False
count = [0]
for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
    orig = getattr(torch.Tensor, name)
    def f(self, *a, _o=orig, **k):
        count[0] += 1; return _o(self, *a, **k)
    setattr(torch.Tensor, name, f)
torch.manual_seed(0)
net = MLPDenoiser(MLPConfig()).eval()
d = GaussianDiffusion(linear_betas(1000))
x0, t, noise = torch.randn(8, 2), torch.randint(1000, (8,)), torch.randn(8, 2)
count[0] = 0; d.training_losses(net, x0, t, noise); print(f"training_losses (simple): {count[0]} reads per call")
for name, run in [("ddpm", lambda n: ddpm_sample(net, d, (4, 2), steps=n, generator=torch.Generator().manual_seed(0))),
                  ("ddim", lambda n: ddim_sample(net, d, (4, 2), steps=n, generator=torch.Generator().manual_seed(0))),
                  ("dpm++", lambda n: dpm_solver_pp_sample(net, d, (4, 2), steps=n, generator=torch.Generator().manual_seed(0)))]:
    c = []
    for n in (10, 20):
        count[0] = 0; run(n); c.append(count[0])
    print(f"{name}: {c[0]} reads at 10 steps, {c[1]} at 20 -> {(c[1]-c[0])/10:.1f} per step, {2*c[0]-c[1]} at entry")
