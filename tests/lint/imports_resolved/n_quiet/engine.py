from n_quiet.utils import publish


def step(pending, t):
    if pending:
        publish(t)  # n_quiet.utils, not m_loud.all_reduce_utils
