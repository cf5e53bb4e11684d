"""A stand-in for ``megatron.core.parallel_state``: its group getters over fixed rank lists."""


class FakeGroup:
    def __init__(self, ranks):
        self.ranks = list(ranks)


class FakeMpu:
    """The getters of megatron.core.parallel_state, over fixed rank lists of one rank."""

    def __init__(self, groups, rank, initialised=True):
        self._g = {n: FakeGroup(next(g for g in gs if rank in g)) for n, gs in groups.items()}
        self._initialised = initialised

    def model_parallel_is_initialized(self):
        return self._initialised

    def get_tensor_model_parallel_group(self, check_initialized=True):
        return self._g["tp"]

    def get_context_parallel_group(self, check_initialized=True):
        return self._g["cp"]

    def get_data_parallel_group(self, with_context_parallel=False, partial_data_parallel=False):
        return self._g["dp_cp" if with_context_parallel else "dp"]

    def get_pipeline_model_parallel_group(self, check_initialized=True):
        return self._g["pp"]

    def get_expert_model_parallel_group(self, check_initialized=True):
        return self._g["ep"]

    def get_expert_tensor_parallel_group(self, check_initialized=True):
        return self._g["etp"]

    def get_expert_data_parallel_group(self, check_initialized=True,
                                       partial_expert_data_parallel=False):
        return self._g["edp"]

    def get_expert_tensor_and_model_parallel_group(self, check_initialized=True):
        return self._g["tp_ep"]

    def get_tensor_and_data_parallel_group(self, check_initialized=True,
                                           with_context_parallel=False):
        assert with_context_parallel, "moe_parallel asks for the tp·cp·dp group"
        return self._g["stage"]


def ranks_of(group):
    return group.ranks


class GroupsAsMpu(FakeMpu):
    """A fake mpu whose getters return real torch ProcessGroups."""

    def __init__(self, groups):
        self._g, self._initialised = dict(groups), True
