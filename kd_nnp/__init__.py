"""kd_nnp: knowledge distillation of teacher interatomic potentials into CHGNet.

Data flows one way, one package folder and one CLI verb per stage::

    sources -> frames store -> teacher labels -> graphs/feature caches
            -> training -> exported student -> evaluation -> reports
"""

__version__ = "0.1.0"
