"""Set-up tools that never run while serving: the model converter, wheel fetching, the sample
photos, the real Triton server, the one server launcher and ``make run``'s demo."""
