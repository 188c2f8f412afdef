"""Test-wide setup.

torchvision (a test-only need of the reference image processor) ships compiled ops that do
not load with the local CPU torch; importing it works once its op registrations are
skipped (phi4mm.md §11). transformers imports torchvision whenever it is installed, so this
must happen before anything imports transformers.
"""
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
