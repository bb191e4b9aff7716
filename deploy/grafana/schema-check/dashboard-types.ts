// The type a dashboard JSON file must satisfy: Grafana's published `Dashboard` (@grafana/schema,
// pinned in package.json to the Grafana version docker-compose.yml runs), made stricter where the
// published type leaves a field open, never looser.
//
// - Every panel is checked against the options and field-config types of its own panel plugin
//   (`PanelTypes` below); `Dashboard` alone types `options` and `fieldConfig.defaults.custom` as
//   `Record<string, unknown>` and so would accept any misspelling there. A panel type missing from
//   `PanelTypes` is an error, so a dashboard can only use panels whose schema Grafana publishes.
// - String enums of the generated types (`ThresholdsMode.Absolute`) are replaced by the strings
//   they stand for (`"absolute"`), which is what a JSON file holds; any other string is an error.
// - Query targets are checked only for the fields every query has (`DataQuery`: refId, datasource,
//   hide, queryType): @grafana/schema does not publish the Prometheus query type.
//
// Fields allowed in spite of the published types are listed in allowlist.json, each with its
// reason; check.mjs removes them before the check.

import type {
  Dashboard as PublishedDashboard,
  DataQuery,
  FieldConfig as PublishedFieldConfig,
  FieldConfigSource as PublishedFieldConfigSource,
  Panel as PublishedPanel,
  RowPanel as PublishedRowPanel,
  VariableModel as PublishedVariableModel,
} from '@grafana/schema';
import type * as annolist from '@grafana/schema/dist/esm/raw/composable/annotationslist/panelcfg/x/AnnotationsListPanelCfg_types.gen.d.ts';
import type * as barchart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen.d.ts';
import type * as bargauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.d.ts';
import type * as candlestick from '@grafana/schema/dist/esm/raw/composable/candlestick/panelcfg/x/CandlestickPanelCfg_types.gen.d.ts';
import type * as canvas from '@grafana/schema/dist/esm/raw/composable/canvas/panelcfg/x/CanvasPanelCfg_types.gen.d.ts';
import type * as dashlist from '@grafana/schema/dist/esm/raw/composable/dashboardlist/panelcfg/x/DashboardListPanelCfg_types.gen.d.ts';
import type * as datagrid from '@grafana/schema/dist/esm/raw/composable/datagrid/panelcfg/x/DatagridPanelCfg_types.gen.d.ts';
import type * as debug from '@grafana/schema/dist/esm/raw/composable/debug/panelcfg/x/DebugPanelCfg_types.gen.d.ts';
import type * as gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen.d.ts';
import type * as geomap from '@grafana/schema/dist/esm/raw/composable/geomap/panelcfg/x/GeomapPanelCfg_types.gen.d.ts';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen.d.ts';
import type * as histogram from '@grafana/schema/dist/esm/raw/composable/histogram/panelcfg/x/HistogramPanelCfg_types.gen.d.ts';
import type * as logs from '@grafana/schema/dist/esm/raw/composable/logs/panelcfg/x/LogsPanelCfg_types.gen.d.ts';
import type * as logsnew from '@grafana/schema/dist/esm/raw/composable/logsnew/panelcfg/x/LogsNewPanelCfg_types.gen.d.ts';
import type * as news from '@grafana/schema/dist/esm/raw/composable/news/panelcfg/x/NewsPanelCfg_types.gen.d.ts';
import type * as nodeGraph from '@grafana/schema/dist/esm/raw/composable/nodegraph/panelcfg/x/NodeGraphPanelCfg_types.gen.d.ts';
import type * as piechart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen.d.ts';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen.d.ts';
import type * as stateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen.d.ts';
import type * as statusHistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen.d.ts';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen.d.ts';
import type * as text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen.d.ts';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.d.ts';
import type * as trend from '@grafana/schema/dist/esm/raw/composable/trend/panelcfg/x/TrendPanelCfg_types.gen.d.ts';
import type * as xychart from '@grafana/schema/dist/esm/raw/composable/xychart/panelcfg/x/XYChartPanelCfg_types.gen.d.ts';

/** A JSON value of type T: string enums become the strings they stand for, recursively. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer Item)[]
    ? Json<Item>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

/** The panel plugins whose option schemas @grafana/schema publishes, by plugin id (a panel's
 * `type`), each with its `Options` and, where the plugin has one, its custom `FieldConfig`
 * (`never`: the plugin has no custom field config). The ids are those of Grafana's built-in panel
 * plugins; tests/deploy/test_deploy_grafana_schema.py checks this list against the package and against
 * grafana-foundation-sdk's panel registry, both generated from the same Grafana panel schemas.
 * (`xychart2` and `logs(new)` in the package are older or duplicate copies of `xychart` and
 * `logsnew` and are left out.) */
export interface PanelTypes {
  annolist: [annolist.Options, never];
  barchart: [barchart.Options, barchart.FieldConfig];
  bargauge: [bargauge.Options, never];
  candlestick: [candlestick.Options, candlestick.FieldConfig];
  canvas: [canvas.Options, never];
  dashlist: [dashlist.Options, never];
  datagrid: [datagrid.Options, never];
  debug: [debug.Options, never];
  gauge: [gauge.Options, never];
  geomap: [geomap.Options, never];
  heatmap: [heatmap.Options, heatmap.FieldConfig];
  histogram: [histogram.Options, histogram.FieldConfig];
  logs: [logs.Options, never];
  logsnew: [logsnew.Options, never];
  news: [news.Options, never];
  nodeGraph: [nodeGraph.Options, never];
  piechart: [piechart.Options, piechart.FieldConfig];
  stat: [stat.Options, never];
  'state-timeline': [stateTimeline.Options, stateTimeline.FieldConfig];
  'status-history': [statusHistory.Options, statusHistory.FieldConfig];
  table: [table.Options, table.FieldConfig];
  text: [text.Options, never];
  timeseries: [timeseries.Options, timeseries.FieldConfig];
  trend: [trend.Options, trend.FieldConfig];
  xychart: [xychart.Options, xychart.FieldConfig];
}

/** Fields every query target has; the datasource-specific rest is not published (see above). */
type Target = Json<Omit<DataQuery, 'datasource'>> & {
  datasource?: Json<PublishedPanel['datasource']>;
} & Record<string, unknown>;

type FieldConfigSource<Custom> = Json<Omit<PublishedFieldConfigSource, 'defaults'>> & {
  defaults: Json<Omit<PublishedFieldConfig, 'custom'>> & { custom?: Json<Custom> };
};

type TypedPanel<Type extends keyof PanelTypes> = Json<
  Omit<PublishedPanel, 'type' | 'options' | 'fieldConfig' | 'targets'>
> & {
  type: Type;
  options?: Json<PanelTypes[Type][0]>;
  fieldConfig?: FieldConfigSource<PanelTypes[Type][1]>;
  targets?: Target[];
};

export type Panel = { [Type in keyof PanelTypes]: TypedPanel<Type> }[keyof PanelTypes];

export type RowPanel = Json<Omit<PublishedRowPanel, 'panels'>> & { panels: Panel[] };

export type VariableModel = Json<PublishedVariableModel>;

export type Dashboard = Json<Omit<PublishedDashboard, 'panels' | 'templating'>> & {
  panels?: (Panel | RowPanel)[];
  templating?: { list?: VariableModel[] };
};
