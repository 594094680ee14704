"""Physics helpers shared by processors and the simulator: X-ray lines and
detector response, powder rings, the pyFAI loader. Tango-free and socket-free."""
