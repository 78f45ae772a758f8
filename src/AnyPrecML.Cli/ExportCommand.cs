using System.CommandLine;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec export`: the decoder graph of an any-precision model as an ONNX file (to inspect, or to load with GraphPath).</summary>
internal static class ExportCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var output = new Option<string>("--output", "-o") { Description = "The .onnx file to write.", Required = true };
        var json = CommonOptions.Json();
        var command = new Command("export", "Write the ONNX decoder graph of an any-precision model (bitplanes stay in the model directory).") { model, output, json };
        command.SetAction(r =>
        {
            using var ap = AnyPrecisionModel.Open(r.GetValue(model)!);
            string path = Path.GetFullPath(r.GetValue(output)!);
            DecoderGraph.Save(ap, path);
            long bytes = new FileInfo(path).Length;
            if (r.GetValue(json)) r.WriteJson(new { output = path, bytes, bits = ap.SupportedBits });
            else r.Out().WriteLine($"wrote {path} ({bytes:N0} bytes): one graph for {ap.SeedBits}..{ap.ParentBits} bits, chosen per run by its 'bits' input");
            return 0;
        });
        return command;
    }
}
