import sys
from pathlib import Path

# Test helpers (hf_reference, meta_checkpoint) are imported as plain modules from this folder.
sys.path.insert(0, str(Path(__file__).parent))
