from cervspine.synthetic.folder import *  # noqa: F403
