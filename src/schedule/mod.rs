pub mod ddim;
