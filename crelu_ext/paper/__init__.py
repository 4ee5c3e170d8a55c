"""The paper's tools (extra ``[paper]``): its networks (``models``), data sets
(``data``), training (``train``) and filter analysis (``analysis``)."""
