//! The science side of the seam: one file (or folder) per stage kind, the training plumbing they
//! share (`fit`, `net`, `checks`), and [`catalog`], the registry of kinds that only the cli
//! calls. The seam itself (`Task`, `StageCtx`, ...) is `crate::stage`.

pub mod checks;
pub mod command;
pub mod evaluate;
pub mod finetune;
pub mod fit;
pub mod gradcam;
pub mod mae;
pub mod net;
pub mod proxy;
pub mod report;

use crate::stage::{entry, Catalog};

/// Every stage kind pretext knows.
pub fn catalog() -> Catalog {
    Catalog::new(vec![
        entry::<command::Command>(),
        entry::<mae::MaeTask>(),
        entry::<finetune::Finetune>(),
        entry::<proxy::Proxy>(),
        entry::<evaluate::Evaluate>(),
        entry::<gradcam::GradCamTask>(),
        entry::<report::Report>(),
    ])
}
